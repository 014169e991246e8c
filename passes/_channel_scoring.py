"""Shared scoring arithmetic for channel morphisms (split, prune), on morphir's public API.

All channels of a group are handled in one pass: a producer's output with every channel
replaced by its variant is computed with one conv (or linear) whose weight holds one θ per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from morphir import MorphGraph, ScoreContext, Site

__all__ = ["incoming_stack", "producer_change", "stack_theta", "consumer_calls"]


def incoming_stack(graph: MorphGraph, sites: Sequence[Site]) -> torch.Tensor:
    """The incoming weights of each site's channel (all in one group), one flat row per site."""
    group = sites[0].anchor
    index = torch.tensor([s.index for s in sites])
    rows = [graph.submodule(p.module).weight.detach()[index].reshape(len(sites), -1)
            for p in graph.group(group).producers]
    return torch.cat(rows, dim=1)


def stack_theta(graph: MorphGraph, group: str, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
    """θ rows of the candidate channels placed in a (width, numel) matrix, zero elsewhere (differentiable)."""
    width = graph.group(group).width
    index = torch.tensor([s.index for s in sites])
    return torch.zeros(width, theta.shape[1], dtype=theta.dtype).index_copy(0, index, theta)


def producer_change(ctx: ScoreContext, group: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per producer call: the change of its output when channel c's incoming weights move by row c of ``full``."""
    graph = ctx.graph
    out: dict[str, torch.Tensor] = {}
    start = 0
    producers = graph.group(group).producers
    for (module_name, shape), prod in zip(graph.incoming_shapes(group), producers):
        n = int(torch.Size(shape).numel())
        weight = full[:, start : start + n].reshape(full.shape[0], *shape)
        start += n
        module = graph.submodule(module_name)
        x = ctx.value(ctx.node(prod.node).args[0].name)
        if isinstance(module, torch.nn.Linear):
            out[prod.node] = F.linear(x, weight)
        else:
            out[prod.node] = module._conv_forward(x, weight, None)
    return out


def consumer_calls(graph: MorphGraph, group: str) -> list[str]:
    """The call nodes of the group's consumers (whose input gradients scoring reads)."""
    return [c.node for c in graph.group(group).consumers]
