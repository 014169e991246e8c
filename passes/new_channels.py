"""Several new neurons per group in one rewrite, and where their weights sit afterwards.

Shared by the growers that build an *overgrown* network (Firefly: many candidate neurons, trained
briefly, the best kept) or a *probe* network (GradMax: one new neuron per basis direction of the
outgoing weights). A new neuron is what ``add_channel`` makes (fresh batch norm, producer bias 0,
depthwise followers the identity), but any number of them per group and with no site limit: all
are copies of channel 0, appended after the old channels in order (new neuron j of a group of
width w is channel w + j).

Two groups grown in one rewrite where one's consumer is the other's producer meet at a *corner*:
the weight with which a new neuron of the second group reads a new neuron of the first. The
rewriter copies it from the reference channel's outgoing weight; :func:`add_neurons` (and the
growers, on their final rewrite) set it to zero, so a new neuron's incoming weights are exactly
the θ given (the corner multiplies a new channel, so the value at growth does not depend on it).

>>> grown, slots = add_neurons(g, {"features.0.0": torch.cat([v, u], dim=1)})   # v: (k, n_in), u: (k, n_out)
>>> read_incoming(grown, slots["features.0.0"])                                  # == v
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphir.api import (Candidate, ChannelCopy, GrowthStep, MorphGraph, Morphism, MorphismError, PassResult,
                         Rewriter, Site, as_args, rewrite)
from morphir.passes.add_channel import fresh_rows

__all__ = [
    "NewNeurons",
    "Block",
    "Slots",
    "add_neurons",
    "locate",
    "zero_corners",
    "read_incoming",
    "read_outgoing",
    "with_neurons",
    "write_neurons",
    "mean_norms",
    "sites_by_group",
    "sample_weights",
    "call",
    "chunks",
]

log = logging.getLogger(__name__)


class NewNeurons(Morphism):
    """``counts[group]`` new channels in each listed group, appended as copies of channel 0 that
    nothing reads (outgoing weights 0). An internal tool: :func:`add_neurons` then writes their
    fresh per-channel values and their weights in a few vectorised operations (one override per
    neuron through the rewriter costs a Python loop per neuron and per tensor), and the growers
    return plain ``add_channel`` candidates for the growth itself. θ is ignored (zeros).

    >>> m = NewNeurons({"0": 3}); c, = m.candidates(g)
    >>> grown = morphir.apply(g, [c])      # three silent copies of channel 0 in group "0"
    """

    name = "new_neurons"
    description = "several silent new channels per group (overgrown and probe networks of firefly and gradmax)"

    def __init__(self, counts: Mapping[str, int]):
        self.counts = {g: int(k) for g, k in counts.items() if int(k) > 0}

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for group in self.counts:
            grp = graph.group(group)
            if not (grp.growable and grp.consumers):
                raise MorphismError(f"new neurons: group {group!r} cannot take new channels")
            yield Site(group, 0)

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return torch.Size([0])

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        return graph.group(site.anchor).cost_of_adding(self.counts[site.anchor])

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        for site, _ in items:
            k = self.counts[site.anchor]
            copies = [ChannelCopy(), *([ChannelCopy(scale=0.0)] * k)]
            rw.set_copies(site.anchor, 0, copies, origin=f"{self.name}@{site}")
        return bool(items)


@dataclass(frozen=True)
class Block:
    """Where some weights of new neurons sit in a grown graph: ``weight[rows][:, cols]`` of ``module``.

    >>> b = slots["features.0.0"].incoming[0]; grown.submodule(b.module).weight[b.rows][:, b.cols]
    """

    module: str
    rows: torch.Tensor
    cols: torch.Tensor


@dataclass(frozen=True)
class Slots:
    """The new neurons of one group in a grown graph.

    ``incoming``: per producer (in the group's order), rows = the new channels, cols = the
    producer's original input features (so the flat layout is that of
    :meth:`MorphGraph.incoming_weights` on the graph before growth). ``outgoing``: per consumer,
    rows = the consumer's original output rows, cols = the new channels' features, channel-major
    (``count × inner`` columns; flat layout of :meth:`MorphGraph.outgoing_weights`).

    >>> s = locate(g, result, {"features.0.0": 5})["features.0.0"]; s.width, s.count
    (16, 5)
    """

    group: str
    width: int
    count: int
    incoming: tuple[Block, ...]
    outgoing: tuple[Block, ...]


def _originals(index: torch.Tensor | None, n: int) -> torch.Tensor:
    """Positions of the original entries after a rewrite that took old entries at ``index``
    (copies come after the original of the same entry, so each entry's first position is its own)."""
    if index is None:
        return torch.arange(n)
    seen: set[int] = set()
    keep = []
    for pos, old in enumerate(index.tolist()):
        if old not in seen:
            seen.add(old)
            keep.append(pos)
    return torch.tensor(keep, dtype=torch.long)


def locate(before: MorphGraph, result: PassResult, counts: Mapping[str, int]) -> dict[str, Slots]:
    """Where the new neurons of each group sit in ``result.graph``, grown from ``before`` with
    ``counts[group]`` new channels appended per group (``add_channel`` at increasing indices, or
    :class:`NewNeurons`).

    >>> slots = locate(g, morphir.rewrite(g, chosen, thetas), {"features.0.0": 5})
    """
    after = result.graph
    out: dict[str, Slots] = {}
    for g, k in counts.items():
        if k <= 0:
            continue
        old, new = before.group(g), after.group(g)
        width = old.width
        fresh = torch.arange(width, width + k)
        incoming = []
        for p in old.producers:
            edit = result.param_edits.get(f"{p.module}.weight")
            n_cols = after.submodule(p.module).weight.shape[1]
            incoming.append(Block(p.module, fresh, _originals(edit.cols if edit is not None else None, n_cols)))
        outgoing = []
        new_consumers = list(new.consumers)
        for c_old in old.consumers:
            c_new = next(c for c in new_consumers if c.module == c_old.module and c.node == c_old.node)
            new_consumers.remove(c_new)
            seg = c_new.segment
            cols = torch.arange(seg.offset + width * seg.inner, seg.offset + (width + k) * seg.inner)
            edit = result.param_edits.get(f"{c_old.module}.weight")
            n_rows = after.submodule(c_old.module).weight.shape[0]
            outgoing.append(Block(c_old.module, _originals(edit.rows if edit is not None else None, n_rows), cols))
        out[g] = Slots(g, width, k, tuple(incoming), tuple(outgoing))
    return out


@torch.no_grad()
def zero_corners(graph: MorphGraph, slots: Mapping[str, Slots]) -> int:
    """Set to zero every weight with which a new neuron reads another new neuron; returns how many.

    >>> zero_corners(grown, slots)
    """
    reads: dict[str, list[torch.Tensor]] = {}
    for s in slots.values():
        for b in s.outgoing:
            reads.setdefault(b.module, []).append(b.cols)
    count = 0
    for s in slots.values():
        for b in s.incoming:
            for cols in reads.get(b.module, []):
                w = graph.submodule(b.module).weight
                w.data[b.rows[:, None], cols[None, :]] = 0
                count += int(b.rows.numel() * cols.numel())
    return count


def _tensor(graph: MorphGraph, module: str, grad: bool) -> torch.Tensor:
    w = graph.submodule(module).weight
    if not grad:
        return w.detach()
    if w.grad is None:
        return torch.zeros_like(w)
    return w.grad


def read_incoming(graph: MorphGraph, slots: Slots, *, grad: bool = False) -> torch.Tensor:
    """The new neurons' flat incoming weights (or their gradients), shape ``(count, n_in)``.

    >>> v = read_incoming(grown, slots["0"])
    """
    parts = [_tensor(graph, b.module, grad)[b.rows][:, b.cols].reshape(slots.count, -1) for b in slots.incoming]
    return torch.cat(parts, dim=1)


def read_outgoing(graph: MorphGraph, slots: Slots, *, grad: bool = False) -> torch.Tensor:
    """The new neurons' flat outgoing weights (or their gradients), shape ``(count, n_out)``.

    >>> u = read_outgoing(grown, slots["0"])
    """
    parts = []
    for b in slots.outgoing:
        w = _tensor(graph, b.module, grad)[b.rows][:, b.cols]  # (out, count·inner, *kernel)
        w = w.reshape(w.shape[0], slots.count, -1, *w.shape[2:]).movedim(1, 0)
        parts.append(w.reshape(slots.count, -1))
    return torch.cat(parts, dim=1)


def with_neurons(weights: Mapping[str, torch.Tensor], slots: Slots, incoming: torch.Tensor | None = None,
                 outgoing: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``weights`` (module name → weight) with the new neurons' weights replaced, differentiably.

    >>> w = with_neurons({m: grown.submodule(m).weight.detach() for m in names}, s, v, u)
    """
    out = dict(weights)
    if incoming is not None:
        start = 0
        for b in slots.incoming:
            w = out[b.module]
            n = int(b.cols.numel() * torch.Size(w.shape[2:]).numel())
            block = incoming[:, start:start + n].reshape(slots.count, b.cols.numel(), *w.shape[2:])
            out[b.module] = w.index_put((b.rows[:, None], b.cols[None, :]), block.to(w))
            start += n
    if outgoing is not None:
        start = 0
        for b in slots.outgoing:
            w = out[b.module]
            inner = b.cols.numel() // slots.count
            n = int(b.rows.numel() * inner * torch.Size(w.shape[2:]).numel())
            block = outgoing[:, start:start + n].reshape(slots.count, b.rows.numel(), inner, *w.shape[2:])
            block = block.movedim(0, 1).reshape(b.rows.numel(), slots.count * inner, *w.shape[2:])
            out[b.module] = w.index_put((b.rows[:, None], b.cols[None, :]), block.to(w))
            start += n
    return out


def write_neurons(graph: MorphGraph, slots: Slots, incoming: torch.Tensor | None = None,
                  outgoing: torch.Tensor | None = None) -> None:
    """Set the new neurons' weights in ``graph`` in place (rows as :func:`read_incoming`/:func:`read_outgoing`).

    >>> write_neurons(grown, slots["0"], incoming=v)
    """
    names = {b.module for b in (*slots.incoming, *slots.outgoing)}
    new = with_neurons({m: graph.submodule(m).weight.detach() for m in names}, slots, incoming, outgoing)
    with torch.no_grad():
        for m, w in new.items():
            graph.submodule(m).weight.copy_(w)


@torch.no_grad()
def _freshen(before: MorphGraph, after: MorphGraph, slots: Slots) -> None:
    """Give the new channels the per-channel values of a freshly initialised channel
    (``add_channel``'s :func:`fresh_rows`: producer bias 0, batch norm at its initial state,
    depthwise followers the identity)."""
    g = slots.group
    producers = {p.module for p in before.group(g).producers}
    fresh = torch.arange(slots.width, slots.width + slots.count)
    for module_name, values in fresh_rows(before, g).items():
        module = after.submodule(module_name)
        if module_name in producers:
            pos = fresh
        else:
            layout = after.analysis.follower_layouts[module_name]
            seg = next(s for s in layout.segments if s.group == g)
            pos = (seg.offset + fresh[:, None] * seg.inner + torch.arange(seg.inner)).reshape(-1)
        for name, value in values.items():
            t = getattr(module, name)
            per_channel = t.shape[1:]
            t.data[pos] = value.to(t).reshape(-1, *per_channel)


def add_neurons(graph: MorphGraph, neurons: Mapping[str, torch.Tensor]) -> tuple[MorphGraph, dict[str, Slots]]:
    """``graph`` with new neurons: ``neurons[group]`` stacks one (incoming, outgoing) row per neuron.
    Each is what ``add_channel`` makes (fresh per-channel values); corners between new neurons are
    zero. ``graph`` itself is not modified.

    >>> grown, slots = add_neurons(g, {"0": torch.zeros(4, g.incoming_numel("0") + g.outgoing_numel("0"))})
    """
    morph = NewNeurons({g: t.shape[0] for g, t in neurons.items()})
    result = rewrite(graph, morph.candidates(graph), verify=False)
    slots = locate(graph, result, morph.counts)
    for g, s in slots.items():
        n_in = graph.incoming_numel(g)
        _freshen(graph, result.graph, s)
        write_neurons(result.graph, s, neurons[g][:, :n_in], neurons[g][:, n_in:])
    zero_corners(result.graph, slots)
    return result.graph, slots


def mean_norms(graph: MorphGraph, group: str) -> tuple[float, float]:
    """Mean norm of the existing channels' flat incoming and outgoing weights in ``group``.

    >>> r_in, r_out = mean_norms(g, "features.0.0")
    """
    grp = graph.group(group)
    width = grp.width
    inc = torch.zeros(width)
    for p in grp.producers:
        inc += graph.submodule(p.module).weight.detach().reshape(width, -1).pow(2).sum(1).cpu()
    out = torch.zeros(width)
    for c in grp.consumers:
        seg = c.segment
        w = graph.submodule(c.module).weight.detach()[:, seg.offset:seg.offset + width * seg.inner]
        out += w.reshape(w.shape[0], width, -1).pow(2).sum((0, 2)).cpu()
    return float(inc.sqrt().mean()), float(out.sqrt().mean())


def sites_by_group(step: GrowthStep) -> dict[str, list[Candidate]]:
    """The step's ``add_channel`` candidates by group, in channel order.

    >>> by_group = sites_by_group(step); by_group["features.0.0"][:2]
    """
    by_group: dict[str, list[Candidate]] = {}
    for c in step.candidates("add_channel"):
        by_group.setdefault(c.site.anchor, []).append(c)
    return {g: sorted(cs, key=lambda c: c.site.index) for g, cs in by_group.items()}


def sample_weights(batches: Sequence[tuple[Any, Any]]) -> list[float]:
    """Each batch's share of the samples (a mean loss per batch, weighted by these, is the mean over samples).

    >>> sample_weights([(x64, y64), (x32, y32)])
    [0.666..., 0.333...]
    """
    sizes = [len(y) if hasattr(y, "__len__") else 1 for _, y in batches]
    total = sum(sizes)
    return [n / total for n in sizes] if total else []


def call(module: torch.nn.Module, x: Any) -> Any:
    """``module(*x)`` for a tuple of inputs, ``module(x)`` otherwise.

    >>> call(graph.module, x)
    """
    return module(*as_args(x))


def chunks(n: int, size: int) -> Iterator[range]:
    """``range(n)`` in consecutive pieces of at most ``size``.

    >>> list(chunks(5, 2))
    [range(0, 2), range(2, 4), range(4, 5)]
    """
    for start in range(0, n, max(size, 1)):
        yield range(start, min(start + size, n))
