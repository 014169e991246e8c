"""``net2net``: Net2WiderNet and Net2DeeperNet (Chen, Goodfellow, Shlens, ICLR 2016).

Widening replicates randomly chosen channels: a replica's incoming weights copy the original's and
both halve what consumers read from them (the ``split`` morphism at θ = 0, exact), then a small
noise ±θ (``noise`` × the channel's incoming-weight norm, in a random direction) breaks the
symmetry. Deepening inserts identity layers after ReLUs (``deepen``'s identity variant, exact),
with noise of the same relative size on the identity. Channels are drawn uniformly: at most
``top_fraction`` of each group's width per step, as for every grower, so methods grow at a
comparable rate; Net2Net itself has no criterion for where to grow.

>>> morphir.grow(model, train, val, F.cross_entropy, method="net2net")
>>> morphir.grow(model, train, val, F.cross_entropy, method=Net2Net(deepen=0))   # widen only
"""

from __future__ import annotations

import torch

from morphir.api import Candidate, Grower, Growth, GrowthStep, MorphGraph, apply_in_turn, candidates
from morphir.passes.split import Split

__all__ = ["Net2Net"]


def _noise(shape: torch.Size, size: float, gen: torch.Generator) -> torch.Tensor:
    d = torch.randn(shape, generator=gen)
    return d * (size / max(float(d.norm()), 1e-12))


class Net2Net(Grower):
    """Widen random channels by replication plus noise; insert ``deepen`` identity layers per step.

    ``noise``: the symmetry-breaking perturbation, relative to the norm of the weights it perturbs.

    >>> growth = Net2Net(noise=1e-2, deepen=1).grow(step)
    """

    name = "net2net"
    description = "Net2WiderNet (replicate random channels + noise) and Net2DeeperNet (identity layers)"
    preserving = True  # exactly so before the noise; the noise moves the function by O(noise)

    def __init__(self, noise: float = 1e-2, deepen: int = 1):
        self.noise = noise
        self.deepen = deepen

    def _widen(self, step: GrowthStep, graph: MorphGraph) -> tuple[list[Candidate], dict[Candidate, torch.Tensor]]:
        gen = step.generator(1)
        by_group: dict[str, list[Candidate]] = {}
        for c in step.candidates(Split(fresh_norm=None)):  # the paper's plain copies
            by_group.setdefault(c.site.anchor, []).append(c)
        chosen, thetas = [], {}
        for group, cands in by_group.items():
            order = torch.randperm(len(cands), generator=gen)[: step.quota(group)]
            for i in sorted(order.tolist()):
                c = cands[i]
                w = graph.incoming_weights(group, c.site.index)
                thetas[c] = _noise(w.shape, self.noise * float(w.norm()), gen)
                chosen.append(c)
        return chosen, thetas

    def _deepen(self, step: GrowthStep, graph: MorphGraph) -> tuple[list[Candidate], dict[Candidate, torch.Tensor]]:
        sites = [c for c in candidates(graph, "deepen", registry=step.registry) if c.site.variant == "identity"]
        if not sites or self.deepen <= 0:
            return [], {}
        gen = step.generator(2)
        picked = [sites[i] for i in sorted(torch.randperm(len(sites), generator=gen)[: self.deepen].tolist())]
        thetas = {}
        for c in picked:
            shape = c.morphism.theta_shape(graph, c.site)
            thetas[c] = _noise(shape, self.noise * float(shape[0]) ** 0.5, gen)  # ‖I‖ = √C
        return picked, thetas

    def grow(self, step: GrowthStep) -> Growth:
        return apply_in_turn(step.graph, [lambda g: self._widen(step, g), lambda g: self._deepen(step, g)])
