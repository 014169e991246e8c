"""Scoring arithmetic for channel morphisms (split, prune, and yours): the change of a group's
producers, and where it enters the group, for every site at once.

All channels of a group are handled in one pass: a producer's output with every channel
replaced by its variant is computed with one conv (or linear) whose weight holds one θ per row.

Batch norm right after a producer acts, in eval mode (as scoring runs), as a per-channel affine
map y = s·x + t. It is folded into the change: the producer's change scaled by s starts at the
batch norm's output, so nothing is recomputed through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from morphir.graph import MorphGraph
from morphir.morphism import Site
from morphir.capture import ScoreContext

__all__ = ["ProducerStart", "consumer_calls", "incoming_stack", "producer_change", "producer_starts", "site_rows", "stack_theta"]


@dataclass(frozen=True)
class ProducerStart:
    """Where one producer's channel change enters the group's carriers.

    ``node`` is the producer's call or the last batch norm that follows it alone; there, channel c
    of the output changes by ``scale[c]`` × the producer's change (``shift`` maps a producer
    output to the node's output: y = scale·x + shift; both None when no batch norm is folded).
    """

    producer: str
    module: str
    node: str
    scale: torch.Tensor | None
    shift: torch.Tensor | None


def incoming_stack(graph: MorphGraph, sites: Sequence[Site]) -> torch.Tensor:
    """The incoming weights of each site's channel (all in one group), one flat row per site.

    >>> incoming_stack(g, [Site("features.0.0", 0), Site("features.0.0", 3)]).shape   # (2, 9)
    """
    group = sites[0].anchor
    index = torch.tensor([s.index for s in sites])
    rows = [graph.submodule(p.module).weight.detach()[index].reshape(len(sites), -1)
            for p in graph.group(group).producers]
    return torch.cat(rows, dim=1)


def site_rows(ctx: ScoreContext, group: str, sites: Sequence[Site]) -> torch.Tensor | None:
    """The channel index of each site, or None when the sites are every channel in order.

    >>> s = dot_at_consumers(ctx, grp, delta); rows = site_rows(ctx, group, sites)
    >>> s if rows is None else s[rows]                  # one row per site
    """
    key = ("channels.rows", group, tuple(s.index for s in sites))
    if key not in ctx.memo:
        index = [s.index for s in sites]
        full = index == list(range(ctx.graph.group(group).width))
        ctx.memo[key] = None if full else torch.tensor(index, device=ctx.losses.device)
    return ctx.memo[key]


def stack_theta(graph: MorphGraph, group: str, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
    """θ rows of the candidate channels placed in a (width, numel) matrix, zero elsewhere (differentiable).

    >>> full = stack_theta(g, "features.0.0", sites, theta)   # then producer_change(ctx, group, full)
    """
    width = graph.group(group).width
    index = [s.index for s in sites]
    if index == list(range(width)):
        return theta
    rows = torch.tensor(index, device=theta.device)
    return torch.zeros(width, theta.shape[1], dtype=theta.dtype, device=theta.device).index_copy(0, rows, theta)


def _batch_norm_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of a batch norm in eval mode, or None if it normalises with batch statistics."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
        return None
    scale = torch.rsqrt(module.running_var.detach() + module.eps)
    shift = -module.running_mean.detach() * scale
    if module.weight is not None:
        scale = scale * module.weight.detach()
        shift = shift * module.weight.detach()
    if module.bias is not None:
        shift = shift + module.bias.detach()
    return scale, shift


def producer_starts(ctx: ScoreContext, group: str) -> list[ProducerStart]:
    """For each producer of ``group``: the node its change enters at, with the folded affine map
    (a batch norm in eval mode that alone follows the producer is folded in, not recomputed).

    >>> [st.node for st in producer_starts(ctx, "features.0.0")]   # ['features_0_1']: after its batch norm
    """
    key = ("channels.starts", group)
    if key in ctx.memo:
        return ctx.memo[key]
    graph = ctx.graph
    grp = graph.group(group)
    members = set(grp.nodes)
    out = []
    for prod in grp.producers:
        node: fx.Node = ctx.node(prod.node)
        scale = shift = None
        while len(node.users) == 1:
            user = next(iter(node.users))
            layout = graph.layout(node.name)
            if (user.op != "call_module" or user.name not in members or not user.args or user.args[0] is not node
                    or len(user.args) + len(user.kwargs) != 1 or layout is None or layout.axis != 1):
                break
            affine = _batch_norm_affine(ctx.module(user.target))
            if affine is None:
                break
            s, t = affine
            scale, shift = (s, t) if scale is None else (scale * s, shift * s + t)
            node = user
        out.append(ProducerStart(prod.node, prod.module, node.name, scale, shift))
    ctx.memo[key] = out
    return out


def producer_change(ctx: ScoreContext, group: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """The change at each producer's start node (see :func:`producer_starts`) when channel c's
    incoming weights move by row c of ``full`` (width × incoming numel), every channel in one conv.

    >>> change = producer_change(ctx, group, stack_theta(ctx.graph, group, sites, theta))
    >>> propagate(ctx, grp, {n: ctx.value(n) + d for n, d in change.items()})
    """
    graph = ctx.graph
    out: dict[str, torch.Tensor] = {}
    begin = 0
    for (_, shape), st in zip(graph.incoming_shapes(group), producer_starts(ctx, group)):
        n = int(torch.Size(shape).numel())
        rows = full[:, begin : begin + n]
        begin += n
        if st.scale is not None:
            rows = rows * st.scale[:, None]
        weight = rows.reshape(full.shape[0], *shape)
        module = ctx.module(st.module)
        x = ctx.value(ctx.node(st.producer).args[0].name)
        if isinstance(module, nn.Linear):
            out[st.node] = F.linear(x, weight)
        else:
            out[st.node] = module._conv_forward(x, weight, None)
    return out


def consumer_calls(graph: MorphGraph, group: str) -> list[str]:
    """The call nodes of the group's consumers (whose input gradients scoring reads): a channel
    morphism's :meth:`~morphir.ScoredMorphism.alias_calls`.

    >>> consumer_calls(g, "features.0.0")   # ['features_1_0']
    """
    return [c.node for c in graph.group(group).consumers]
