"""``s2d``: splitting steepest descent (Liu, Wang, Wu, Liu, "Splitting Steepest Descent for Growing
Neural Architectures", NeurIPS 2019).

Splitting neuron i (incoming weights wᵢ, pre-activation uᵢ = sᵢ·wᵢ·x̃ + tᵢ, with sᵢ, tᵢ a batch norm
folded in eval mode, x̃ the incoming patch) into two halves at wᵢ ± ε vᵢ leaves the first-order term
of the loss at zero and changes it by ½ ε² vᵢᵀ Sᵢ vᵢ + O(ε³), with the *splitting matrix*

    Sᵢ = E[ Σ_positions ∂L/∂aᵢ · σ''(uᵢ) · sᵢ² · x̃ x̃ᵀ ]          (aᵢ = σ(uᵢ); E over the samples)

so the best direction is the eigenvector of the smallest eigenvalue λᵢ of Sᵢ, and neurons with the
most negative λᵢ gain most from splitting. This module computes every Sᵢ of a layer with one pass
per batch (a weighted Gram matrix of the unfolded patches), splits the neurons with λᵢ < 0, most
negative first, at most ``step.quota(group, positive)`` per group (the rate of the ``gn`` method),
along θᵢ = ε ‖wᵢ‖ vᵢ, with one ε for all of them: the best of a small grid by the real loss on the
step's batches and its held-out batches (never one that raises it; none at all: nothing split).

**σ'' of a kinked activation** (ReLU, ReLU6, hardtanh, leaky ReLU, PReLU, and the kinks of ELU,
SELU, hardsigmoid, hardswish) is a Dirac δ at each kink, weighted by the jump of σ' there. It is
replaced by a Gaussian kernel φ_h of bandwidth h: for ReLU that is exactly σ'' of
σ_h(u) = E_ξ[relu(u + ξ)], ξ ~ N(0, h²), i.e. a kernel density estimate of the mass of uᵢ at the
kink, weighted by ∂L/∂a and x̃x̃ᵀ. h follows Silverman's normal-reference rule per channel,
h = 1.06 · std(uᵢ) · n^(−1/5) (n: the sample-positions the matrix is averaged over), times
``bandwidth``. Smooth activations (tanh, sigmoid, softplus, GELU, SiLU, ...) use their exact σ''
(elementwise, by autograd).

**Which layers.** A group is split when it has one producer (a dense conv or a linear layer) whose
output, after an optional batch norm, feeds one elementwise activation, and no other activation of
the group follows. Others (a residual stream, a depthwise stage with a second activation) are
skipped and listed in ``Growth.info["s2d_skipped"]``. Max pooling after the activation is allowed
but its own kinks (ties within a window, where a split copy can switch the maximum) are not
modelled, as in the paper.

>>> morphir.grow(model, train, val, F.cross_entropy, method="s2d")        # once registered
>>> morphir.grow(model, train, val, F.cross_entropy, method=SplittingSteepestDescent(bandwidth=2.0))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphir.api import Candidate, Grower, Growth, GrowthStep, MorphGraph, MorphirError, apply, mean_loss
from morphir.passes.split import Split
from morphir.passes.s2d_activations import second_derivative
from morphir.passes.s2d_matrices import LossFn, SplittingMatrices, splitting_matrices

__all__ = ["DEFAULT_GRID", "LineSearch", "SplittingMatrices", "SplittingSteepestDescent", "second_derivative",
           "split_line_search", "splitting_matrices"]

log = logging.getLogger(__name__)


DEFAULT_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
"""Step sizes of the line search, relative to each split neuron's ‖wᵢ‖ (θᵢ = ε ‖wᵢ‖ vᵢ); the largest is
the trust radius the ``gn`` method learns θ within (``ScoreConfig.trust``)."""


# -- the line search ------------------------------------------------------------------------------------


def _weight_dtype(graph: MorphGraph, group: str) -> torch.dtype:
    return graph.submodule(graph.group(group).producers[0].module).weight.dtype


@dataclass
class LineSearch:
    """The line search's result: ``eps`` (0 when no step size lowered the loss), ``base`` (the loss
    before splitting) and ``losses`` (the loss after splitting at each step size tried).

    >>> ls = split_line_search(g, cands, directions, batches, F.cross_entropy); ls.eps, ls.gain
    """

    eps: float
    base: float
    losses: dict[float, float]

    @property
    def gain(self) -> float:
        """base − loss at ``eps`` (≥ 0; 0 when ``eps`` is 0)."""
        return self.base - self.losses[self.eps] if self.eps else 0.0


def split_line_search(graph: MorphGraph, cands: Sequence[Candidate], directions: Mapping[Candidate, torch.Tensor],
                batches: Sequence[tuple[Any, Any]], loss_fn: LossFn, *,
                grid: Sequence[float] = DEFAULT_GRID) -> LineSearch:
    """The ε of ``grid`` that minimises the real loss on ``batches`` when every candidate is split at
    θ = ε · ``directions[c]`` (one shared ε), or 0 when none is lower than the loss before
    splitting: the result never raises the loss on ``batches``.

    The split network's weights are affine in ε (its producer rows are w ± ε·direction), so two
    rewrites serve the whole grid; the winner is then re-measured on a real rewrite at that ε (the
    θ the growth loop will apply), and kept only if that loss is below the loss before splitting.

    >>> ls = split_line_search(g, cands, {c: w_norm * v for c, ...}, batches, F.cross_entropy)
    >>> thetas = {c: ls.eps * directions[c] for c in cands}
    """
    cands = list(cands)

    def thetas(eps: float) -> dict[Candidate, torch.Tensor]:
        return {c: (eps * directions[c]).to(_weight_dtype(graph, c.site.anchor)) for c in cands}

    base = mean_loss(graph.module, batches, loss_fn)
    losses: dict[float, float] = {0.0: base}
    grid = sorted({float(e) for e in grid if e > 0})
    if not cands or not grid:
        return LineSearch(0.0, base, losses)
    zero = apply(graph, cands, None, verify=False)
    unit = apply(graph, cands, thetas(1.0), verify=False)
    params = dict(zero.module.named_parameters())
    origin = {k: p.detach().clone() for k, p in params.items()}
    slope = {k: p.detach() - origin[k] for k, p in unit.module.named_parameters() if not torch.equal(p, origin[k])}
    with torch.no_grad():
        for eps in grid:
            for k, d in slope.items():
                params[k].copy_(origin[k] + eps * d)
            losses[eps] = mean_loss(zero.module, batches, loss_fn)
    finite = {e: v for e, v in losses.items() if math.isfinite(v)}
    best = min(finite, key=lambda e: (finite[e], e)) if finite else 0.0
    if best and finite[best] < base:
        real = apply(graph, cands, thetas(best), verify=False)  # the real θ, not its line through the slope
        losses[best] = mean_loss(real.module, batches, loss_fn)
    if not best or not losses[best] < base:
        best = 0.0
    return LineSearch(best, base, losses)


# -- the grower -----------------------------------------------------------------------------------------
class SplittingSteepestDescent(Grower):
    """Split the neurons whose splitting matrix has the most negative λ_min along its eigenvector,
    with one step size found by a line search on the real loss.

    At a growth step: Sᵢ of every neuron of every layer it models, on the step's batches; per
    group, the neurons with λᵢ < 0, most negative first, at most ``step.quota(group, positive)``;
    θᵢ = ε ‖wᵢ‖ vᵢ with ε the best of ``grid`` by the real loss on ``step.all_batches()`` (the
    batches S was estimated on and the held-out ones: what the loop measures its loss jump on). With a
    positive ``lam`` a split is kept only if its second-order gain −½ ε² ‖wᵢ‖² λᵢ exceeds λ·ΔR (ΔR
    per ``resource``), and the line search runs again on those kept.

    ``preserving = True`` means: each split is the ``split`` morphism, exact at θ = 0 (the engine
    checks it), and at the chosen ε the network's function moves by O(ε²) per split, only in the
    direction the line search accepted: the mean loss on ``step.all_batches()`` does not rise (it
    falls by ``Growth.info["s2d_line_search_gain"]``, which the loop's ``loss_jump`` reproduces).
    Outputs on other inputs are not preserved, and the loss there may rise. When no ε lowers the
    loss nothing is split (a split at ε = 0 would keep two identical copies forever).

    ``grid``: the step sizes tried (relative to ‖wᵢ‖); ``bandwidth``: scales the kernel that
    smooths a kinked σ''; ``max_dim``: layers with more incoming weights per neuron are skipped
    (the dense Sᵢ costs d² memory and d³ time per neuron).

    >>> growth = SplittingSteepestDescent().grow(step)
    >>> growth.info["s2d_eps"], [str(c.site) for c in growth.chosen][:3]
    """

    name = "s2d"
    description = "splitting steepest descent: split along the min eigenvector of the splitting matrix (Liu et al. 2019)"
    preserving = True

    def __init__(self, grid: Sequence[float] = DEFAULT_GRID, bandwidth: float = 1.0, max_dim: int = 1024):
        if not grid or any(not e > 0 for e in grid):
            raise MorphirError(f"the line-search grid must be positive step sizes, got {tuple(grid)}")
        if not bandwidth > 0:
            raise MorphirError(f"bandwidth must be positive, got {bandwidth}")
        self.grid = tuple(float(e) for e in grid)
        self.bandwidth = float(bandwidth)
        self.max_dim = int(max_dim)

    def directions(self, step: GrowthStep) -> tuple[list[Candidate], dict[Candidate, torch.Tensor],
                                                    dict[Candidate, float], dict[str, str]]:
        """The candidates to split (ranked and capped per group), each one's unit-step direction
        ‖wᵢ‖ vᵢ and λᵢ ‖wᵢ‖² (the curvature along it), and the groups skipped with the reason.

        >>> chosen, dirs, curv, skipped = SplittingSteepestDescent().directions(step)
        """
        graph = step.graph
        cands = step.candidates(Split(fresh_norm=None))  # the paper's plain copies
        by_group: dict[str, list[Candidate]] = {}
        for c in cands:
            by_group.setdefault(c.site.anchor, []).append(c)
        skipped: dict[str, str] = {}
        sms = splitting_matrices(graph, step.batches, step.loss_fn, groups=list(by_group), bandwidth=self.bandwidth,
                                 max_dim=self.max_dim, skipped=skipped)
        chosen: list[Candidate] = []
        dirs: dict[Candidate, torch.Tensor] = {}
        curv: dict[Candidate, float] = {}
        for group, group_cands in by_group.items():
            sm = sms.get(group)
            if sm is None:
                continue
            negative = [c for c in group_cands if float(sm.eigenvalues[c.site.index]) < 0]
            negative.sort(key=lambda c: (float(sm.eigenvalues[c.site.index]), c.site.index))
            for c in negative[: step.quota(group, len(negative))]:
                i = c.site.index
                w_norm = float(sm.weight_norms[i])
                dtype = graph.incoming_weights(group, i).dtype
                dirs[c] = (w_norm * sm.directions[i]).to(dtype)
                curv[c] = float(sm.eigenvalues[i]) * w_norm**2
                chosen.append(c)
        return chosen, dirs, curv, skipped

    def grow(self, step: GrowthStep) -> Growth:
        cfg = step.config
        chosen, dirs, curv, skipped = self.directions(step)
        info: dict[str, Any] = {"s2d_skipped": skipped, "s2d_eps": 0.0, "s2d_line_search_gain": 0.0,
                                "s2d_candidates": len(chosen)}
        if not chosen:
            log.info("s2d: no neuron has a negative splitting eigenvalue")
            return Growth(info=info)
        search = split_line_search(step.graph, chosen, dirs, step.all_batches(), step.loss_fn, grid=self.grid)
        if search.eps and cfg.lam > 0:
            def cost(c: Candidate) -> int:
                return c.delta_params if cfg.resource == "params" else c.delta_flops

            kept = [c for c in chosen if -0.5 * search.eps**2 * curv[c] > cfg.lam * cost(c)]
            if len(kept) < len(chosen):
                chosen = kept
                search = (split_line_search(step.graph, chosen, dirs, step.all_batches(), step.loss_fn, grid=self.grid)
                          if chosen else LineSearch(0.0, search.base, {0.0: search.base}))
        info.update({"s2d_eps": search.eps, "s2d_line_search_gain": search.gain,
                     "s2d_line_search": {str(e): v for e, v in sorted(search.losses.items())}})
        if not search.eps:
            log.info("s2d: no step size of %s lowered the loss; nothing split", self.grid)
            return Growth(info=info)
        thetas = {c: search.eps * dirs[c] for c in chosen}
        gain = -0.5 * search.eps**2 * sum(curv[c] for c in chosen)
        log.info("s2d: splitting %d neurons at ε = %g (loss %.5f -> %.5f)", len(chosen), search.eps, search.base,
                 search.losses[search.eps])
        return Growth(chosen=chosen, thetas=thetas, estimated_gain=gain, info=info)
