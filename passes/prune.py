"""``prune``: remove a channel; θ is subtracted from its incoming weights.

θ = 0 changes nothing; θ = w_in (the default) leaves the channel a constant, which is removed
from every producer and consumer of its group and folded into the consumers' biases where that
is exact. Any other θ shrinks the incoming weights and keeps the channel. A channel whose
incoming weights are already zero is removed (at any θ) exactly when its constant folds exactly,
since then removing it changes nothing. A group is never pruned to zero channels.

>>> cands = morphir.candidates(g, "prune")
>>> g2 = morphir.apply(g, cands[:1])          # one channel fewer
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from morphir.api import (MorphGraph, Rewriter, ScoreContext, ScoredMorphism, Site, consumer_calls, dot_at_consumers,
                         incoming_stack, producer_change, producer_starts, propagate, site_rows, stack_theta)

__all__ = ["Prune"]


class Prune(ScoredMorphism):
    """Prune channel ``site.index`` of group ``site.anchor``."""

    name = "prune"
    removes_channel = True
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
            w_in = rw.graph.incoming_weights(site.anchor, site.index)
            if not bool(torch.any(w_in != 0)):
                # θ = 0 and θ = w_in coincide: the channel is already a constant. Remove it when that
                # constant folds exactly, which changes nothing, so both readings hold.
                if rw.folds_exactly(site.anchor, site.index):
                    rw.remove(site.anchor, site.index, origin=f"prune@{site}")
                    modified = True
                continue
            if not bool(torch.any(theta != 0)):
                continue
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
        with torch.no_grad():  # θ is fixed: nothing to differentiate
            key = ("prune.is_default", group, tuple(s.index for s in sites))
            stamp = (theta.data_ptr(), theta._version)  # the same θ storage, unchanged since last asked
            if key not in ctx.memo or ctx.memo[key][0] != stamp:
                ctx.memo[key] = (stamp, torch.equal(theta, incoming_stack(ctx.graph, sites)))
            if ctx.memo[key][1]:
                start = self._bias_only(ctx, group, sites)  # w_in − θ = 0: only the bias is left
            else:
                change = producer_change(ctx, group, stack_theta(ctx.graph, group, sites, theta))
                start = {n: ctx.value(n) - d for n, d in change.items()}
            pruned = propagate(ctx, grp, start)

            def delta(node: str) -> torch.Tensor | None:
                return pruned[node] - ctx.value(node) if node in pruned else None

            s = dot_at_consumers(ctx, grp, delta)
            rows = site_rows(ctx, group, sites)
            return s if rows is None else s[rows]

    @staticmethod
    def _bias_only(ctx: ScoreContext, group: str, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
        """Each producer's start value with the pruned channels replaced by their constant: the
        bias (zero without one), through any batch norm folded into the start."""
        key = ("prune.constants", group, tuple(s.index for s in sites))
        if key not in ctx.memo:
            width = ctx.graph.group(group).width
            consts = {}
            for st in producer_starts(ctx, group):
                bias = ctx.module(st.module).bias
                weight = ctx.module(st.module).weight
                const = bias.detach() if bias is not None else weight.new_zeros(width)
                if st.scale is not None:
                    const = const * st.scale + st.shift
                layout = ctx.graph.layout(st.node)
                shape = [1] * layout.ndim
                shape[layout.axis] = -1
                mask = torch.zeros(width, dtype=torch.bool, device=const.device)
                mask[[s.index for s in sites]] = True
                consts[st.node] = (mask.view(shape), const.view(shape))
            ctx.memo[key] = consts
        return {n: torch.where(mask, const, ctx.value(n)) for n, (mask, const) in ctx.memo[key].items()}
