"""Gauss-Newton scoring: learn θ for every candidate and estimate the loss change ΔL.

For a morphism whose change first appears at z, with g = ∂L/∂z and L̂ the loss,

    ΔL(θ) ≈ Δz(θ)·g + (Δz(θ)·g)² / (4 L̂)

(Lawton, Galstyan, Ver Steeg, arXiv 2411.05855). One forward/backward per batch captures the
activations and the gradients at every point a morphism reads; each morphism's
:meth:`~morphir.ScoredMorphism.local_change` turns them into s = Δz·g per sample for all its sites of
one batch key at once (every channel of a layer together); θ is learned by Adam on the estimate
with the weights frozen, kept in a trust region, and the estimate is averaged over batches (EMA).

>>> cands = morphir.score(g, train_batches, torch.nn.functional.cross_entropy)
>>> best = sorted(cands, key=lambda c: c.estimate)[:10]
>>> g2 = morphir.apply(g, best, "learned")
"""

from __future__ import annotations

import logging
from abc import abstractmethod
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from morphir.batches import eval_mode, mean_loss
from morphir.engine import apply
from morphir.errors import MorphirError, MorphismError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism, Registry, Site, resolve
from morphir.capture import (CURVATURES, Capturer, LossFn, ScoreContext, capture, curvature_factors, dot_at_consumers, grad_dot, propagate)

__all__ = ["Capturer", "ScoreConfig", "ScoreContext", "ScoredMorphism", "Scorer", "capture", "curvature_factors",
           "dot_at_consumers", "exact_delta_loss", "exact_delta_losses", "gn_estimate", "grad_dot", "propagate",
           "score", "spearman"]

log = logging.getLogger(__name__)


Batches = Callable[[], Iterable[tuple[Any, Any]]] | Iterable[tuple[Any, Any]]


SCORE_KEY = "morphir.score"


_MIN_LOSS = 1e-8


class ScoredMorphism(Morphism):
    """The scoring protocol: a :class:`~morphir.Morphism` the Gauss-Newton pass can estimate.

    It adds :meth:`local_change` (Δz·g per site and sample) and hooks with defaults: which sites
    are scored together, θ's start and trust radius, and which gradients the pass captures. A
    morphism that does not score subclasses :class:`~morphir.Morphism` alone and stays small; it
    may say why in ``why_not_scored``, which the error names when it is asked for.

    >>> class Split(morphir.ScoredMorphism):
    ...     def local_change(self, ctx, sites, theta): ...
    """

    learnable: ClassVar[bool] = True
    """Whether θ is learned when scoring (False: θ stays at its default, e.g. a prune)."""

    def batch_key(self, graph: MorphGraph, site: Site) -> Hashable:
        """Sites with the same key are scored together, θ stacked (default: each site alone)."""
        return site

    def init_theta(self, graph: MorphGraph, sites: Sequence[Site], trust: float, gen: torch.Generator) -> torch.Tensor:
        """Starting θ for ``sites`` stacked on dim 0, within the trust region (default: zeros)."""
        return torch.stack([self.zero_theta(graph, s) for s in sites])

    def trust_radius(self, graph: MorphGraph, sites: Sequence[Site], trust: float) -> torch.Tensor:
        """Largest norm of θ allowed per site when learning θ (default: unbounded)."""
        return torch.full((len(sites),), float("inf"))

    def alias_calls(self, graph: MorphGraph, sites: Sequence[Site]) -> Iterable[str]:
        """Call nodes whose input gradient (through that call only) ``local_change`` reads."""
        return ()

    def grad_nodes(self, graph: MorphGraph, sites: Sequence[Site]) -> Iterable[str]:
        """Nodes whose output gradient ``local_change`` reads."""
        return ()

    def site_nodes(self, graph: MorphGraph, site: Site) -> Iterable[str]:
        """Nodes that carry the site's score record: a group's producer calls, or the anchor node."""
        if site.anchor in graph.analysis.groups:
            return [p.node for p in graph.group(site.anchor).producers]
        return [site.anchor]

    @abstractmethod
    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        """Δz(θ)·g per site and sample, shape ``(len(sites), N)``, differentiable in ``theta``.

        Δz is the change the morphism makes where it first appears (a consumer's input, the output
        of an anchor node) and g the per-sample loss gradient there, both read from ``ctx``; the
        scoring pass turns it into ΔL ≈ s + s²/(4L).
        """


@dataclass(frozen=True)
class ScoreConfig:
    """Knobs of the scoring pass (defaults are the measured choices, see docs/scoring.md).

    ``trust``: θ of a site is kept within ``trust`` × the norm of the weights it perturbs.
    ``ema``: momentum of the moving average of ΔL over batches.
    ``per_sample``: estimate Σᵢ [sᵢ + sᵢ²/(4Lᵢ)] / N instead of the paper's whole-batch s + s²/(4L̂).
    ``final_pass``: after learning θ, :func:`score` makes one more pass over the batches with θ
    fixed and reports the mean estimate there, so the estimate belongs to the θ returned (the EMA
    lags behind a θ that is still moving and understated splits' ΔL about threefold).
    ``curvature``: the second-order term of the estimate. ``"rank-one"`` is the paper's
    (Δz·g)²/(4L), the curvature of the loss along g alone; ``"gauss-newton"`` is ½ Δzᵀ Jᵀ H J Δz,
    with H the Hessian of each sample's loss at the network's output and J the Jacobian from z to
    it, computed exactly from H's eigenvectors (one batched backward pass per output feature; with
    more than ``MAX_CURVATURE_OUTPUTS`` output features per sample, rank-one is used). Rank-one
    sees no curvature across g, so Adam moves θ there freely: the estimates overstate the gain and
    the true loss can rise (see docs/tasks.md).
    """

    lr: float = 1e-2
    trust: float = 0.3
    ema: float = 0.9
    per_sample: bool = True
    epochs: int = 1
    seed: int = 0
    final_pass: bool = True
    curvature: str = "rank-one"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise MorphirError(f"ScoreConfig.curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}")


def _batches(batches: Batches) -> Iterable[tuple[Any, Any]]:
    return batches() if callable(batches) else batches


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties broken by order).

    >>> spearman([0.1, 0.3, 0.2], [1.0, 3.0, 2.5])
    1.0
    """
    ra = torch.tensor(list(a)).argsort().argsort().double()
    rb = torch.tensor(list(b)).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def gn_estimate(s: torch.Tensor, losses: torch.Tensor, *, per_sample: bool,
                inv4l: torch.Tensor | None = None) -> torch.Tensor:
    """ΔL from s = Δz·g per site and sample, shape (sites, N) -> (sites,).

    Whole-batch: s̄ + s̄²/(4 L̂); per-sample: mean over n of sₙ + sₙ²/(4 Lₙ). ``inv4l``: 1/(4 Lₙ)
    computed once for a batch scored many times (the scoring pass passes it). With curvature
    probes s has shape (sites, N, 1 + K), Δz·g and then Δz·gₖ, and the estimate is the
    Gauss-Newton one, mean over n of sₙ,₀ + ½ Σₖ sₙ,ₖ² (the same per sample and whole-batch).

    >>> gn_estimate(s, ctx.losses, per_sample=True)
    """
    if s.dim() == 3:
        return _gauss_newton_per_sample(s).mean(dim=1)
    if per_sample:
        if inv4l is None:
            inv4l = 1.0 / (4 * losses.clamp_min(_MIN_LOSS))
        return (s + s * s * inv4l).mean(dim=1)
    mean = s.mean(dim=1)
    return mean + mean.pow(2) / (4 * losses.mean().clamp_min(_MIN_LOSS))


def _gauss_newton_per_sample(s: torch.Tensor) -> torch.Tensor:
    """sₙ,₀ + ½ Σₖ sₙ,ₖ² per site and sample, from s of shape (sites, N, 1 + K)."""
    return s[..., 0] + 0.5 * s[..., 1:].pow(2).sum(-1)


# -- the scoring pass -------------------------------------------------------------------------------
def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)  # one kernel for all θ tensors
    except (RuntimeError, TypeError):  # a torch or device without fused Adam
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _project(theta: torch.Tensor, radius: torch.Tensor) -> None:
    with torch.no_grad():
        norms = torch.linalg.vector_norm(theta.reshape(theta.shape[0], -1), dim=1)
        theta.mul_((radius / norms.clamp_min(1e-12)).clamp_max(1.0).view(-1, *([1] * (theta.dim() - 1))))


class Scorer:
    """The scoring pass one batch at a time: ``step(x, y)`` per batch, then ``finish()``.

    :func:`score` is this loop over batches; use a Scorer to interleave scoring with other work.
    ``only`` restricts scoring to those candidates (default: every candidate of ``morphisms``);
    ``init`` gives the θ some candidates start from (the others start where their morphism's
    ``init_theta`` puts them; each given θ is projected into its trust region).

    >>> scorer = Scorer(g, F.cross_entropy, ("split",))
    >>> for x, y in loader: scorer.step(x, y)
    >>> cands = scorer.finish()
    """

    def __init__(
        self,
        graph: MorphGraph,
        loss_fn: LossFn,
        morphisms: Sequence[str | Morphism] = ("split", "prune"),
        *,
        config: ScoreConfig | None = None,
        registry: Registry | None = None,
        only: Iterable[Candidate] | None = None,
        init: Mapping[Candidate, torch.Tensor] | None = None,
    ):
        self.graph, self.loss_fn = graph, loss_fn
        self.cfg = config or ScoreConfig()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        keep = None if only is None else set(only)
        self.plans: list[tuple[Morphism, list[Candidate], torch.Tensor, torch.Tensor]] = []
        self.alias_calls: set[str] = set()
        self.grad_nodes: set[str] = set()
        for spec in morphisms:
            m = resolve(spec, registry)
            if not isinstance(m, ScoredMorphism):
                why = getattr(m, "why_not_scored", "") or "it is no morphir.ScoredMorphism (it defines no local change)"
                raise MorphismError(f"morphism {m.name!r} cannot be scored: {why}")
            by_key: dict[Any, list[Candidate]] = defaultdict(list)
            for c in m.candidates(graph):
                if keep is None or c in keep:
                    by_key[m.batch_key(graph, c.site)].append(c)
            for group in by_key.values():
                sites = [c.site for c in group]
                theta = m.init_theta(graph, sites, self.cfg.trust, gen)
                radius = m.trust_radius(graph, sites, self.cfg.trust)
                if init:
                    given = [(j, init[c]) for j, c in enumerate(group) if c in init]
                    if given:
                        with torch.no_grad():
                            for j, t in given:
                                theta[j].copy_(t.reshape(theta[j].shape).to(theta))
                            _project(theta, radius)
                self.plans.append((m, group, theta, radius))
                self.alias_calls |= set(m.alias_calls(graph, sites))
                self.grad_nodes |= set(m.grad_nodes(graph, sites))
        learnable = [p[2].requires_grad_() for p in self.plans if p[0].learnable]
        self.opt = _adam(learnable, self.cfg.lr) if learnable else None
        self.capturer = Capturer(graph, grad_nodes=self.grad_nodes, alias_calls=self.alias_calls,
                                 curvature=self.cfg.curvature)
        self.memo: dict[Any, Any] = {}
        self.ema: list[torch.Tensor | None] = [None] * len(self.plans)
        self.fixed_sum: list[torch.Tensor] | None = None
        self.fixed_sumsq: list[torch.Tensor] | None = None
        self.fixed_count = 0  # samples (per-sample estimates) or batches behind fixed_sum
        self.fixed_steps = 0
        self.steps = 0

    def step(self, x: Any, y: Any, *, learn: bool = True) -> None:
        """One forward/backward of the network, the estimates of every candidate, one Adam step on θ.

        With ``learn=False`` θ stays fixed and the estimates are averaged instead (see ``final_pass``).
        """
        if not learn:
            self._fixed_step(x, y)
            return
        total = torch.zeros(())
        with eval_mode(self.graph.module):
            ctx = self.capturer(x, y, self.loss_fn, memo=self.memo)
            inv4l = 1.0 / (4 * ctx.losses.clamp_min(_MIN_LOSS))
            for i, (m, group, theta, _) in enumerate(self.plans):
                s = m.local_change(ctx, [c.site for c in group], theta)
                est = gn_estimate(s, ctx.losses, per_sample=self.cfg.per_sample, inv4l=inv4l)
                e = est.detach()
                self.ema[i] = e if self.ema[i] is None else self.cfg.ema * self.ema[i] + (1 - self.cfg.ema) * e
                if m.learnable:
                    total = total + est.sum()
        if self.opt is not None:
            self.opt.zero_grad()
            total.backward()
            self.opt.step()
            for m, _, theta, radius in self.plans:
                if m.learnable:
                    _project(theta, radius)
        self.steps += 1

    @torch.no_grad()
    def _fixed_step(self, x: Any, y: Any) -> None:
        with eval_mode(self.graph.module):
            ctx = self.capturer(x, y, self.loss_fn, memo=self.memo)
            if self.fixed_sum is None:
                self.fixed_sum = [ctx.losses.new_zeros(len(p[1]), dtype=torch.float64) for p in self.plans]
                self.fixed_sumsq = [ctx.losses.new_zeros(len(p[1]), dtype=torch.float64) for p in self.plans]
            inv4l = 1.0 / (4 * ctx.losses.clamp_min(_MIN_LOSS))
            for i, (m, group, theta, _) in enumerate(self.plans):
                s = m.local_change(ctx, [c.site for c in group], theta.detach())
                if s.dim() == 3:  # Gauss-Newton curvature: every sample's estimate
                    e = _gauss_newton_per_sample(s).double()
                    if not self.cfg.per_sample:
                        e = e.mean(dim=1, keepdim=True)
                elif self.cfg.per_sample:  # every sample's estimate: the mean and its standard error
                    e = (s + s * s * inv4l).double()
                else:  # one estimate per batch
                    e = gn_estimate(s, ctx.losses, per_sample=False).double().unsqueeze(1)
                self.fixed_sum[i] += e.sum(dim=1)
                self.fixed_sumsq[i] += e.pow(2).sum(dim=1)
            self.fixed_count += int(ctx.losses.numel()) if self.cfg.per_sample else 1
        self.fixed_steps += 1

    def finish(self) -> list[Candidate]:
        """Attach θ and the estimate to every candidate and to its nodes' metadata; return them."""
        if self.steps == 0 and self.fixed_steps == 0:
            raise MorphirError("score got no batches; pass a non-empty iterable of (x, y)")
        out: list[Candidate] = []
        self.graph.invalidate(SCORE_KEY)  # records of an earlier pass on this graph are stale now
        for i, (m, group, theta, _) in enumerate(self.plans):
            for j, c in enumerate(group):
                c.theta = theta[j].detach().clone()
                if self.fixed_steps:
                    n = self.fixed_count
                    mean = float(self.fixed_sum[i][j]) / n
                    var = max(float(self.fixed_sumsq[i][j]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
                    c.estimate = mean
                    c.extra["stderr"] = math.sqrt(var / n)
                else:
                    c.estimate = float(self.ema[i][j])
                out.append(c)
                record = {"morphism": c.name, "site": str(c.site), "estimate": c.estimate,
                          "delta_params": c.delta_params, "delta_flops": c.delta_flops}
                for node in m.site_nodes(self.graph, c.site):
                    existing = self.graph.node(node).meta.get(SCORE_KEY, [])
                    self.graph.set_meta(node, SCORE_KEY, [*existing, record])
        log.info("scored %d candidates over %d batches", len(out), self.steps)
        return out


def score(
    graph: MorphGraph,
    batches: Batches,
    loss_fn: LossFn,
    morphisms: Sequence[str | Morphism] = ("split", "prune"),
    *,
    config: ScoreConfig | None = None,
    registry: Registry | None = None,
    estimate_batches: Batches | None = None,
    init: Mapping[Candidate, torch.Tensor] | None = None,
) -> list[Candidate]:
    """Score every candidate of ``morphisms`` on ``graph``: learn θ, estimate ΔL, attach both.

    ``batches``: an iterable of ``(x, y)`` or a callable returning one (called once per epoch);
    ``loss_fn(output, y)``: a mean loss. ``morphisms``: Morphism instances, or names looked up in
    ``registry`` (``morphir.score`` defaults it to the built-ins). The network runs in eval mode;
    its weights and ``.grad`` are not touched. ``estimate_batches``: make the final pass over these instead (held-out
    batches: an estimate on the batches θ was learned on is biased towards gains that do not
    generalise). ``init``: the θ some candidates start from (see :class:`Scorer`; the ``gn``
    grower starts splits at splitting steepest descent's directions). Each candidate gets ``.theta``, ``.estimate`` (ΔL at that θ: the mean over a
    final pass with θ fixed, or the EMA over batches without ``final_pass``),
    ``.extra["stderr"]`` (the standard error of that mean, over samples, after a final pass),
    ``.delta_params`` and ``.delta_flops``, and the same record is written to
    ``node.meta["morphir.score"]`` of the nodes at its site (dropped by any later rewrite).

    >>> cands = morphir.score(g, lambda: train_loader, F.cross_entropy, config=morphir.ScoreConfig(epochs=2))
    """
    scorer = Scorer(graph, loss_fn, morphisms, config=config, registry=registry, init=init)
    for _ in range(scorer.cfg.epochs):
        for x, y in _batches(batches):
            scorer.step(x, y)
    if scorer.cfg.final_pass or estimate_batches is not None:
        for x, y in _batches(batches if estimate_batches is None else estimate_batches):
            scorer.step(x, y, learn=False)
    return scorer.finish()


# -- the brute-force reference ------------------------------------------------------------------------
def _mean_loss(graph: MorphGraph, batches: Batches, loss_fn: LossFn) -> float:
    return mean_loss(graph.module, _batches(batches), loss_fn)


def exact_delta_losses(graph: MorphGraph, cands: Sequence[Candidate], batches: Batches, loss_fn: LossFn) -> list[float]:
    """The exact loss change of each candidate with its θ: one expanded network per candidate.

    >>> exact = morphir.exact_delta_losses(g, cands, val_batches, F.cross_entropy)
    """
    base = _mean_loss(graph, batches, loss_fn)
    out = []
    for c in cands:
        theta = {c: c.theta} if c.theta is not None else None
        out.append(_mean_loss(apply(graph, [c], theta, verify=False), batches, loss_fn) - base)
    return out


def exact_delta_loss(graph: MorphGraph, candidate: Candidate, batches: Batches, loss_fn: LossFn) -> float:
    """The exact loss change of one candidate with its θ (its default θ if not scored).

    >>> morphir.exact_delta_loss(g, cands[0], val_batches, F.cross_entropy)
    """
    return exact_delta_losses(graph, [candidate], batches, loss_fn)[0]
