"""``prune``: remove a channel; θ is subtracted from its incoming weights.

θ = 0 changes nothing; θ = w_in (the default) leaves the channel a constant, which is removed
from every producer and consumer of its group and folded into the consumers' biases where that
is exact. Any other θ shrinks the incoming weights and keeps the channel. A group is never
pruned to zero channels.

>>> cands = morphir.candidates(g, "prune")
>>> g2 = morphir.apply(g, cands[:1])          # one channel fewer
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from morphir import MorphGraph, Morphism, Rewriter, ScoreContext, Site, dot_at_consumers, propagate
from morphir.passes._channel_scoring import consumer_calls, incoming_stack, producer_change, stack_theta

__all__ = ["Prune"]


class Prune(Morphism):
    """Prune channel ``site.index`` of group ``site.anchor``."""

    name = "prune"
    description = "remove a channel (θ = its incoming weights), folding its constant into biases"

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for grp in graph.groups:
            if grp.growable and grp.width > 1:
                yield from (Site(grp.name, c) for c in range(grp.width))

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return torch.Size([graph.incoming_numel(site.anchor)])

    def default_theta(self, graph: MorphGraph, site: Site) -> torch.Tensor:
        return graph.incoming_weights(site.anchor, site.index).clone()

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        return graph.group(site.anchor).cost_of_adding(-1)

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        modified = False
        for site, theta in items:
            if not bool(torch.any(theta != 0)):
                continue
            w_in = rw.graph.incoming_weights(site.anchor, site.index)
            if torch.equal(theta.to(w_in), w_in):
                rw.remove(site.anchor, site.index, origin=f"prune@{site}")
            else:
                delta = {k: -v for k, v in rw.graph.unflatten_incoming(site.anchor, theta).items()}
                rw.perturb(site.anchor, site.index, delta, origin=f"prune@{site}")
            modified = True
        return modified

    # -- scoring: θ is fixed at its default (the channel's incoming weights) and only estimated ----
    learnable = False

    def batch_key(self, graph: MorphGraph, site: Site) -> str:
        return site.anchor

    def init_theta(self, graph: MorphGraph, sites: Sequence[Site], trust: float, gen: torch.Generator) -> torch.Tensor:
        return incoming_stack(graph, sites)

    def alias_calls(self, graph: MorphGraph, sites: Sequence[Site]) -> list[str]:
        return consumer_calls(graph, sites[0].anchor)

    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        group = sites[0].anchor
        grp = ctx.graph.group(group)
        change = producer_change(ctx, group, stack_theta(ctx.graph, group, sites, theta))
        pruned = propagate(ctx, grp, {n: ctx.value(n) - d for n, d in change.items()})

        def delta(node: str) -> torch.Tensor | None:
            return pruned[node] - ctx.value(node) if node in pruned else None

        return dot_at_consumers(ctx, grp, delta)[[s.index for s in sites]]
