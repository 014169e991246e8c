"""``split``: one channel becomes two, incoming weights w ± θ, outgoing weights halved.

At θ = 0 both copies equal the original and each consumer reads half of each, so the function
is unchanged; θ ≠ 0 moves the copies apart, which changes the function only through a
nonlinearity, so only groups with one are offered.

**Fresh norms.** Training grows incoming weights' norms (2 to 5 times in the VGG-19 seed's first
20 epochs on digits), and under a batch norm a channel's direction moves at the effective learning
rate lr/‖w‖², so copies of a trained channel barely move again: measured, 80 more epochs leave
them at cosine > 0.95, one feature computed twice. Where a batch norm directly follows the
group's producer, the first copy's incoming weights are therefore scaled down to ``fresh_norm``
(1/√3, the norm of a row at PyTorch's default initialisation) and the second's to ``ratio`` (½)
times that, so the copies learn at a fresh channel's pace and at different paces, and drift
apart; the batch norm's running statistics are scaled alike, so the function is unchanged
(exactly in eval mode, for any θ). ``Split(fresh_norm=None)`` keeps both copies at the original's
norm (the paper's split).

>>> cands = morphir.candidates(g, "split")
>>> g2 = morphir.apply(g, cands[:1])          # one more channel in cands[0].site.anchor
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from morphir.api import (MorphGraph, MorphismError, Rewriter, ScoreContext, ScoredMorphism, Site, batch_norm_after,
                         consumer_calls, dot_at_consumers, incoming_stack, producer_change, propagate, site_rows,
                         stack_theta)

__all__ = ["FRESH_NORM", "Split"]

FRESH_NORM = 3**-0.5  # the norm of a row of nn.Conv2d / nn.Linear at PyTorch's default initialisation


class Split(ScoredMorphism):
    """Split channel ``site.index`` of group ``site.anchor`` in every producer and consumer."""

    name = "split"
    description = "split a channel in two: incoming weights w ± θ, outgoing weights halved"

    def __init__(self, fresh_norm: float | None = FRESH_NORM, ratio: float = 0.5) -> None:
        if fresh_norm is not None and not fresh_norm > 0:
            raise MorphismError(f"fresh_norm must be a positive norm or None, got {fresh_norm!r}")
        if not 0 < ratio <= 1:
            raise MorphismError(f"ratio must be in (0, 1], got {ratio!r}")
        self.fresh_norm = None if fresh_norm is None else float(fresh_norm)
        self.ratio = float(ratio)

    def copy_scales(self, graph: MorphGraph, site: Site) -> tuple[float, float]:
        """The factors (s₁, s₂) the two copies' incoming weights are scaled by where a batch norm
        directly follows the producer: s₁ brings the first copy down to ``fresh_norm`` (never up),
        s₂ = ``ratio`` · s₁; (1, 1) elsewhere or with ``fresh_norm=None``.

        >>> Split().copy_scales(g, Site("features.0.0", 3))   # a channel at norm 1.4
        (0.41, 0.21)
        """
        return self.group_scales(graph, site.anchor, [site.index])[0]

    def group_scales(self, graph: MorphGraph, group: str, channels: Sequence[int]) -> list[tuple[float, float]]:
        """:meth:`copy_scales` of several channels of one group, from one pass over its weights.

        >>> Split().group_scales(g, "features.0.0", [0, 3])   # [(0.52, 0.26), (0.41, 0.21)]
        """
        bn_name = None if self.fresh_norm is None else batch_norm_after(graph, group)
        if bn_name is None:
            return [(1.0, 1.0)] * len(channels)
        producer = graph.submodule(graph.group(group).producers[0].module)
        index = torch.as_tensor(list(channels), dtype=torch.long)
        norms = producer.weight.detach()[index].reshape(len(index), -1).norm(dim=1).double()
        bn = graph.submodule(bn_name)
        floor = torch.zeros_like(norms)
        if bn.track_running_stats and bn.running_var is not None:  # keep the rescaled variance positive
            var = bn.running_var.detach()[index].double()
            floor = torch.sqrt(2 * bn.eps / (var + bn.eps)).clamp(max=1.0)
        s1 = torch.maximum((self.fresh_norm / norms).clamp(max=1.0), floor)
        s1 = torch.where(norms > 0, s1, torch.ones_like(s1))
        s2 = torch.where(norms > 0, torch.maximum(self.ratio * s1, floor), torch.ones_like(s1))
        return list(zip(s1.tolist(), s2.tolist()))

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for grp in graph.groups:
            if grp.growable and grp.nonlinear:
                yield from (Site(grp.name, c) for c in range(grp.width))

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return torch.Size([graph.incoming_numel(site.anchor)])

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        return graph.group(site.anchor).cost_of_adding(1)

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        by_group: dict[str, list[tuple[Site, torch.Tensor]]] = {}
        for site, theta in items:
            by_group.setdefault(site.anchor, []).append((site, theta))
        for group, its in by_group.items():
            deltas = [rw.graph.unflatten_incoming(group, theta) if bool(torch.any(theta != 0)) else None for _, theta in its]
            rw.split_channels(group, [site.index for site, _ in its], deltas,
                              self.group_scales(rw.graph, group, [site.index for site, _ in its]),
                              [f"split@{site}" for site, _ in its])
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
