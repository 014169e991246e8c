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

from morphir import MorphGraph, Morphism, Rewriter, ScoreContext, Site, dot_at_consumers, propagate
from morphir.passes._channel_scoring import consumer_calls, incoming_stack, producer_change, site_rows, stack_theta

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

    # -- scoring ---------------------------------------------------------------------------------
    def batch_key(self, graph: MorphGraph, site: Site) -> str:
        return site.anchor

    def trust_radius(self, graph: MorphGraph, sites: Sequence[Site], trust: float) -> torch.Tensor:
        return trust * incoming_stack(graph, sites).norm(dim=1)

    def init_theta(self, graph: MorphGraph, sites: Sequence[Site], trust: float, gen: torch.Generator) -> torch.Tensor:
        # θ = 0 is a stationary point of a split's ΔL (it is even in θ): start on a random
        # direction at half the trust radius
        w = incoming_stack(graph, sites)
        direction = torch.randn(w.shape, generator=gen).to(w)  # drawn on the CPU generator, then moved
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return direction * (0.5 * trust * w.norm(dim=1, keepdim=True))

    def alias_calls(self, graph: MorphGraph, sites: Sequence[Site]) -> list[str]:
        return consumer_calls(graph, sites[0].anchor)

    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        group = sites[0].anchor
        grp = ctx.graph.group(group)
        change = producer_change(ctx, group, stack_theta(ctx.graph, group, sites, theta))
        # both copies in one pass: stacked along the batch (falls back to two passes if an op
        # in the chain does not keep the batch, e.g. a view with the batch size written in)
        both = propagate(ctx, grp, {n: torch.cat([ctx.value(n) + d, ctx.value(n) - d]) for n, d in change.items()},
                         stacked=2)
        if both is None:
            plus = propagate(ctx, grp, {n: ctx.value(n) + d for n, d in change.items()})
            minus = propagate(ctx, grp, {n: ctx.value(n) - d for n, d in change.items()})

            def delta(node: str) -> torch.Tensor | None:
                return (plus[node] + minus[node]) / 2 - ctx.value(node) if node in plus else None
        else:
            def delta(node: str) -> torch.Tensor | None:  # the mean of the two copies, less the original
                return both[node].unflatten(0, (2, -1)).mean(0) - ctx.value(node) if node in both else None

        s = dot_at_consumers(ctx, grp, delta)
        rows = site_rows(ctx, group, sites)
        return s if rows is None else s[rows]
