"""``firefly``: overgrow with small new neurons, train them briefly, keep the best (Wu, Liu, Stone,
Liu, "Firefly Neural Architecture Descent", NeurIPS 2020).

Per group with quota q, ``m = max(q + 1, ceil(overgrow · q))`` candidate neurons are proposed:
neuron j reads the group's inputs with incoming weights vⱼ and writes to its consumers with
outgoing weights ε·uⱼ. ‖vⱼ‖ is held at the group's mean incoming norm and ‖uⱼ‖ at its mean
outgoing norm (the norm constraint: directions are optimised, norms fixed, as the official code
projects back to the target magnitude after every step), so ε is the new neurons' size relative
to an existing one. Every group's candidates are added at once (the *overgrown* network), and
only (vⱼ, uⱼ) are optimised by Adam for ``steps`` steps on the step's batches (the network in eval
mode, so batch norms use their recalibrated running statistics and the fresh ones of the new
channels). Each candidate is then scored by the first-order Taylor coefficient of the loss in its
scale, the paper's sⱼ = ∂L/∂εⱼ at ε = 0: ⟨∇_{ωⱼ} L, uⱼ⟩ with ωⱼ = εⱼuⱼ and the gradient taken at
the optimised (vⱼ, uⱼ) with every candidate silent, over all the step's batches. At ε = 0 the
scores do not depend on one another, so the loss change of any kept subset is Σ εⱼ sⱼ + O(ε²)
(measured at the overgrown point instead, the other candidates' O(ε) changes, largely redundant
after the same optimisation, halved the scores on VGG-19 and the estimate missed the jump twofold).
The ``q`` with the largest |sⱼ| per group are returned as
``add_channel`` candidates with θ = (vⱼ, ±ε·uⱼ), the sign chosen so that the first-order change
−ε·|∂L/∂εⱼ| is a decrease. Splitting existing neurons, the paper's other candidate family, is not
proposed here (``gn`` and ``net2net`` split).

**Not function-preserving.** The network changes by O(ε) at growth: to first order the loss moves
by Σ_kept εⱼ ∂L/∂εⱼ = −ε Σ_kept |∂L/∂εⱼ|, which is reported as ``estimated_gain`` (−ΔL); the loop
measures the actual jump (``loss_jump``), which differs from −estimated_gain by O(ε²) (the
candidates left out and the second-order terms). ``preserving = False`` says so.

>>> morphir.grow(model, train, val, F.cross_entropy, method=Firefly(eps=0.01), phases=3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from morphir.api import (Candidate, Grower, Growth, GrowthStep, MorphirError, as_args, log_entry, rewrite)
from morphir.passes.new_channels import (
    add_neurons,
    locate,
    mean_norms,
    sample_weights,
    sites_by_group,
    with_neurons,
    zero_corners,
)
from morphir.passes.add_channel import AddChannel

__all__ = ["Firefly", "Proposal", "keep_best"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class Proposal:
    """Firefly's candidates after their optimisation, per group.

    ``incoming[g]``: (m, n_in) and ``outgoing[g]``: (m, n_out) weights of the m candidates
    (outgoing already ε-scaled); ``taylor[g]``: ∂L/∂εⱼ of each (signed); ``loss_before`` /
    ``loss_after``: the overgrown network's mean loss on the step's batches before and after the
    optimisation; ``eps``: ε.

    >>> prop = Firefly().propose(step); prop.loss_after < prop.loss_before
    True
    """

    incoming: dict[str, torch.Tensor] = field(default_factory=dict)
    outgoing: dict[str, torch.Tensor] = field(default_factory=dict)
    taylor: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_before: float = math.nan
    loss_after: float = math.nan
    eps: float = 0.0


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Firefly(Grower):
    """Overgrow every group with ε-small candidate neurons, optimise them, keep the top ``quota`` by
    |∂L/∂ε| (see the module docstring). ``eps``: ε; ``overgrow``: candidates per kept neuron;
    ``steps``: Adam steps on the candidates (one batch each, cycling through the step's batches);
    ``lr``: Adam's learning rate on the candidates' directions (unit-free: the directions are
    normalised to their norms in the forward pass).

    >>> growth = Firefly(eps=0.01, steps=20).grow(step)
    """

    name = "firefly"
    description = "overgrow with ε-small new neurons, optimise them briefly, keep the best by |∂L/∂ε| (Firefly)"
    preserving = False

    def __init__(self, *, eps: float = 0.01, overgrow: float = 2.0, steps: int = 20, lr: float = 0.1):
        if not eps > 0 or overgrow < 1 or steps < 0 or not lr >= 0:
            raise MorphirError(f"Firefly needs eps > 0, overgrow >= 1, steps >= 0 and lr >= 0; got eps={eps}, "
                               f"overgrow={overgrow}, steps={steps}, lr={lr}")
        self.eps, self.overgrow, self.steps, self.lr = eps, overgrow, steps, lr

    def morphisms(self) -> list[AddChannel]:
        return [AddChannel()]

    def candidates_per_group(self, quota: int) -> int:
        """How many candidates are proposed for ``quota`` kept neurons (at least one more).

        >>> Firefly().candidates_per_group(5)
        10
        """
        return max(quota + 1, math.ceil(self.overgrow * quota))

    def propose(self, step: GrowthStep) -> Proposal:
        """Propose, optimise and score the candidates of every group (the graph is not modified).

        >>> prop = Firefly().propose(step); prop.taylor["features.0.0"]
        """
        graph = step.graph
        groups = {g: self.candidates_per_group(step.quota(g)) for g in sites_by_group(step)}
        if not groups:
            return Proposal(eps=self.eps)
        gen = step.generator(7)
        radius: dict[str, tuple[float, float]] = {}
        directions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for g, m in groups.items():
            radius[g] = mean_norms(graph, g)
            directions[g] = (torch.randn(m, graph.incoming_numel(g), generator=gen),
                             torch.randn(m, graph.outgoing_numel(g), generator=gen))

        def weights_of(g: str, dv: torch.Tensor, du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            r_in, r_out = radius[g]
            return r_in * _unit(dv), self.eps * r_out * _unit(du)

        start = {g: torch.cat(weights_of(g, *d), dim=1) for g, d in directions.items()}
        over, slots = add_neurons(graph, start)
        gm = over.module
        gm.eval()
        for p in gm.parameters():
            p.requires_grad_(False)
        base = {b.module: over.submodule(b.module).weight.detach()
                for s in slots.values() for b in (*s.incoming, *s.outgoing)}

        def params(neurons: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
            w = dict(base)
            for g, (v, u) in neurons.items():
                w = with_neurons(w, slots[g], v, u)
            return {f"{m}.weight": t for m, t in w.items()}

        batches, shares = step.batches, sample_weights(step.batches)

        def mean_loss(neurons: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
            with torch.no_grad():
                p = params(neurons)
                return sum(float(step.loss_fn(functional_call(gm, p, as_args(x)), y)) * s
                           for (x, y), s in zip(batches, shares))

        raw = {g: (dv.clone().requires_grad_(), du.clone().requires_grad_()) for g, (dv, du) in directions.items()}
        loss_before = mean_loss({g: weights_of(g, *d) for g, d in raw.items()})
        if self.steps and self.lr > 0 and batches:
            opt = torch.optim.Adam([t for pair in raw.values() for t in pair], lr=self.lr)
            for t in range(self.steps):
                x, y = batches[t % len(batches)]
                with torch.enable_grad():
                    loss = step.loss_fn(functional_call(gm, params({g: weights_of(g, *d) for g, d in raw.items()}),
                                                        as_args(x)), y)
                    opt.zero_grad()
                    loss.backward()
                opt.step()
        final = {g: tuple(w.detach() for w in weights_of(g, *d)) for g, d in raw.items()}
        loss_after = mean_loss(final)

        # ∂L/∂εⱼ at ε = 0 (every candidate silent, so the scores do not depend on one another):
        # ⟨∇_{ωⱼ} L, uⱼ⟩ with the gradient at ω = 0, over all the step's batches
        leaves = {g: (v, torch.zeros_like(u).requires_grad_()) for g, (v, u) in final.items()}
        grads = {g: torch.zeros_like(u) for g, (_, u) in leaves.items()}
        for (x, y), share in zip(batches, shares):
            with torch.enable_grad():
                loss = step.loss_fn(functional_call(gm, params(leaves), as_args(x)), y) * share
                got = torch.autograd.grad(loss, [u for _, u in leaves.values()])
            for g, gr in zip(leaves, got):
                grads[g] += gr
        prop = Proposal(loss_before=loss_before, loss_after=loss_after, eps=self.eps)
        for g, (v, u) in final.items():
            prop.incoming[g], prop.outgoing[g] = v, u
            prop.taylor[g] = (grads[g] * u).sum(dim=1) / self.eps  # u = ε·(unit direction · norm)
        log.info("firefly: overgrown loss %.6f -> %.6f after %d steps", loss_before, loss_after, self.steps)
        return prop

    def grow(self, step: GrowthStep) -> Growth:
        graph = step.graph
        by_group = sites_by_group(step)
        prop = self.propose(step)
        morph = AddChannel()
        chosen: list[Candidate] = []
        thetas: dict[Candidate, torch.Tensor] = {}
        counts: dict[str, int] = {}
        gain = 0.0
        for g, cands in by_group.items():
            keep = keep_best(prop.taylor[g], min(step.quota(g), len(cands)))
            for c, j in zip(cands, keep):
                s = float(prop.taylor[g][j])
                sign = -1.0 if s > 0 else 1.0  # a descent direction to first order
                thetas[c] = morph.pack(graph, g, incoming=prop.incoming[g][j], outgoing=sign * prop.outgoing[g][j])
                chosen.append(c)
                gain += self.eps * abs(s)
            counts[g] = len(keep)
        if not chosen:
            return Growth()
        result = rewrite(graph, chosen, thetas)
        zero_corners(result.graph, locate(graph, result, counts))
        return Growth(chosen=chosen, thetas=thetas, estimated_gain=gain, result=result,
                      log=[log_entry(c, thetas[c]) for c in chosen],
                      info={"firefly_loss_before": prop.loss_before, "firefly_loss_after": prop.loss_after})


def keep_best(taylor: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest |∂L/∂ε| (ties: lower index first), best first.

    >>> keep_best(torch.tensor([0.1, -0.5, 0.3]), 2)
    [1, 2]
    """
    order = sorted(range(taylor.numel()), key=lambda j: (-abs(float(taylor[j])), j))
    return order[:k]


