"""``split``: one channel becomes two, incoming weights w ± θ, outgoing weights halved.

At θ = 0 both copies equal the original and each consumer reads half of each, so the function
is unchanged; θ ≠ 0 moves the copies apart, which changes the function only through a
nonlinearity, so only groups with one are offered.

>>> cands = morphir.candidates(g, "split")
>>> g2 = morphir.apply(g, cands[:1])          # one more channel in cands[0].site.anchor
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from morphir import MorphGraph, Morphism, Rewriter, Site

__all__ = ["Split"]


class Split(Morphism):
    """Split channel ``site.index`` of group ``site.anchor`` in every producer and consumer."""

    name = "split"
    description = "split a channel in two: incoming weights w ± θ, outgoing weights halved"

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for grp in graph.groups:
            if grp.growable and grp.nonlinear:
                yield from (Site(grp.name, c) for c in range(grp.width))

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return torch.Size([graph.incoming_numel(site.anchor)])

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        return graph.group(site.anchor).cost_of_adding(1)

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        for site, theta in items:
            delta = rw.graph.unflatten_incoming(site.anchor, theta) if bool(torch.any(theta != 0)) else None
            rw.split(site.anchor, site.index, delta, origin=f"split@{site}")
        return bool(items)
