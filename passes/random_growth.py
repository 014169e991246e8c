"""``random``: new neurons with random incoming weights and zero outgoing weights.

Nothing reads a new neuron until training moves its outgoing weights away from zero, so the
function is unchanged at growth (exact). The incoming weights are drawn per producer from a
normal distribution with the root-mean-square of that producer's existing weights, so a new
neuron starts on the scale of its group. Where to grow is drawn uniformly: at most
``top_fraction`` of each group's width per step, the rate every grower uses.

>>> morphir.grow(model, train, val, F.cross_entropy, method="random")
"""

from __future__ import annotations

import torch

from morphir.api import Candidate, Grower, Growth, GrowthStep, MorphGraph
from morphir.passes.add_channel import AddChannel

__all__ = ["RandomGrowth", "random_incoming"]


def random_incoming(graph: MorphGraph, group: str, gen: torch.Generator) -> torch.Tensor:
    """Random flat incoming weights for a new channel of ``group``, each producer's part on the
    scale (root-mean-square) of that producer's weights.

    >>> v = random_incoming(g, "features.0", torch.Generator().manual_seed(0))
    """
    parts = []
    for module, shape in graph.incoming_shapes(group):
        w = graph.submodule(module).weight.detach()
        rms = float(w.pow(2).mean().sqrt()) if w.numel() else 0.0
        parts.append(torch.randn(torch.Size(shape).numel(), generator=gen) * rms)
    return torch.cat(parts) if parts else torch.zeros(0)


class RandomGrowth(Grower):
    """Add ``top_fraction`` × width random neurons (random incoming, zero outgoing) to every group.

    >>> growth = RandomGrowth().grow(step)
    """

    name = "random"
    description = "new neurons with random incoming and zero outgoing weights at random places"
    preserving = True

    def morphisms(self) -> list[AddChannel]:
        return [AddChannel()]

    def grow(self, step: GrowthStep) -> Growth:
        graph, morph, gen = step.graph, AddChannel(), step.generator(1)
        by_group: dict[str, list[Candidate]] = {}
        for c in step.candidates("add_channel"):
            by_group.setdefault(c.site.anchor, []).append(c)
        chosen: list[Candidate] = []
        thetas: dict[Candidate, torch.Tensor] = {}
        for group, cands in by_group.items():
            for i in sorted(torch.randperm(len(cands), generator=gen)[: step.quota(group)].tolist()):
                c = cands[i]
                thetas[c] = morph.pack(graph, group, incoming=random_incoming(graph, group, gen))
                chosen.append(c)
        return Growth(chosen=chosen, thetas=thetas)
