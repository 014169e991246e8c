"""The channel-rule protocol: what a rule reads and records while the channel analysis walks a graph.

A rule for an op is a function ``rule(ctx, node, module)``; it reads shapes and input layouts
through the :class:`RuleContext` and records where the op's output channels sit
(:class:`TensorChannels`), or why they cannot grow. The built-in rules are in
:mod:`morphir.channel_rules`; the analysis that runs them is :mod:`morphir.channels`.

>>> ctx.passthrough(node, src)          # the op keeps its input's channels
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["Rule", "RuleContext", "TensorChannels"]


@dataclass(frozen=True)
class TensorChannels:
    """Where a tensor's channels sit: the channel ``axis``, the tensor's rank ``ndim``, and its
    channels as ``segs``, (channel space id, features per channel) segments in order.

    >>> TensorChannels(axis=1, ndim=4, segs=((0, 1),))   # an NCHW tensor of one channel space
    """

    axis: int
    ndim: int
    segs: tuple[tuple[int, int], ...]


Rule = Callable[["RuleContext", fx.Node, "torch.nn.Module | None"], None]
"""A channel rule: ``rule(ctx, node, module)`` sets ``node``'s layout through ``ctx``."""


class RuleContext:
    """What a channel rule may read and record. Rules receive it as their first argument.

    A rule for an op usually does one of: ``ctx.passthrough(node, src)`` (channels unchanged),
    ``ctx.produce(node, module, kind)`` / ``ctx.consume(...)`` (a layer), ``ctx.merge(a, b, why)``
    (two tensors share channels), or ``ctx.unknown(node, why)`` (not growable, with the reason).
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.space_graph = nx.Graph()
        self.widths: list[int] = []
        self.reasons: dict[int, list[str]] = defaultdict(list)
        self.nonlinear_spaces: set[int] = set()
        self.producers: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
        self.followers: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
        self.consumers: list[tuple[str, str, str, TensorChannels]] = []
        self.follower_layouts: dict[str, TensorChannels] = {}
        self.carriers: dict[int, list[str]] = defaultdict(list)
        self.layouts: dict[str, TensorChannels] = {}
        self.tuple_layouts: dict[str, list[TensorChannels | None]] = {}
        self.reshapes: list[tuple[str, tuple[int, ...], TensorChannels]] = []
        self.module_io: dict[str, tuple[TensorChannels | None, TensorChannels | None]] = {}

    # reading
    def shape(self, node: Any) -> torch.Size | None:
        """Output shape of ``node`` if it is a tensor node."""
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return meta.shape if isinstance(meta, TensorMetadata) else None

    def layout(self, node: Any) -> TensorChannels | None:
        """Layout of ``node``'s output, or None (not a channel tensor)."""
        return self.layouts.get(node.name) if isinstance(node, fx.Node) else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        """The fx nodes among ``node``'s arguments whose output is a tensor."""
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if self.shape(a) is not None else None)
        return found

    def width(self, lay: TensorChannels) -> int:
        """Number of features along the channel axis of ``lay``."""
        return sum(self.widths[s] * inner for s, inner in lay.segs)

    # recording
    def new_space(self, node: fx.Node, width: int, origin: str) -> int:
        """Open a new channel space of ``width`` channels created at ``node``."""
        sid = len(self.widths)
        self.widths.append(int(width))
        self.space_graph.add_node(sid, width=int(width), origin=origin, node=node.name)
        return sid

    def set(self, node: fx.Node, lay: TensorChannels | None) -> None:
        """Record ``lay`` as the layout of ``node``'s output."""
        if lay is None:
            return
        self.layouts[node.name] = lay
        for s, _ in lay.segs:
            self.carriers[s].append(node.name)

    def fresh(self, node: fx.Node, origin: str, axis: int = 1) -> TensorChannels | None:
        """Give ``node`` a layout made of one new space (its full channel axis)."""
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        axis = axis % len(shape)
        lay = TensorChannels(axis, len(shape), ((self.new_space(node, shape[axis], origin), 1),))
        self.set(node, lay)
        return lay

    def block(self, lay: TensorChannels | None, reason: str) -> None:
        """Mark every space in ``lay`` as not growable because of ``reason``."""
        if lay is None:
            return
        for s, _ in lay.segs:
            if reason not in self.reasons[s]:
                self.reasons[s].append(reason)

    def mark_nonlinear(self, lay: TensorChannels | None) -> None:
        """Record that a nonlinearity acts on the spaces of ``lay``."""
        if lay is not None:
            self.nonlinear_spaces.update(s for s, _ in lay.segs)

    def merge(self, a: TensorChannels, b: TensorChannels, why: str) -> bool:
        """Tie the channels of ``a`` and ``b`` (same axis, same segmentation); block both if impossible."""
        compatible = (
            a.axis == b.axis
            and len(a.segs) == len(b.segs)
            and all(ia == ib and self.widths[sa] == self.widths[sb] for (sa, ia), (sb, ib) in zip(a.segs, b.segs))
        )
        if not compatible:
            self.block(a, f"{why}: its operands lay out channels differently")
            self.block(b, f"{why}: its operands lay out channels differently")
            return False
        for (sa, _), (sb, _) in zip(a.segs, b.segs):
            if sa != sb:
                self.space_graph.add_edge(sa, sb, why=why)
        return True

    def passthrough(self, node: fx.Node, src: fx.Node | None = None, *, nonlinear: bool = False) -> None:
        """``node`` keeps the channels of ``src`` (default: its first tensor argument)."""
        if src is None:
            args = self.tensor_args(node)
            src = args[0] if args else None
        lay = self.layout(src)
        out = self.shape(node)
        if lay is None or out is None:
            self.unknown(node, f"`{_describe(node)}` has no channel input")
            return
        if len(out) != lay.ndim or out[lay.axis] != self.width(lay):
            self.unknown(node, f"`{_describe(node)}` changes the channel axis")
            return
        if nonlinear:
            self.mark_nonlinear(lay)
        self.set(node, lay)

    def unknown(self, node: fx.Node, reason: str) -> None:
        """An op whose channel semantics are unknown: block its inputs, give its output a blocked space."""
        for arg in self.tensor_args(node):
            self.block(self.layout(arg), reason)
        out = self.fresh(node, origin=reason)
        self.block(out, reason)

    def produce(self, node: fx.Node, module_name: str, kind: str, axis: int) -> TensorChannels | None:
        """``node`` (a call of ``module_name``) writes a new space of channels on ``axis``."""
        prev = self.module_io.get(module_name)
        if prev is not None and prev[1] is not None:
            lay = prev[1]
            self.set(node, lay)
            return lay
        lay = self.fresh(node, origin=f"{kind} {module_name}", axis=axis)
        if lay is not None:
            self.producers[lay.segs[0][0]].append((module_name, node.name, kind))
        return lay

    def consume(self, node: fx.Node, src: fx.Node, module_name: str, kind: str) -> None:
        """``module_name`` reads the channels of ``src`` as its input features."""
        lay = self.layout(src)
        if lay is None:
            return
        prev = self.module_io.get(module_name)
        if prev is not None and prev[0] is not None:
            self.merge(prev[0], lay, f"module {module_name} is called more than once")
            return
        self.consumers.append((module_name, node.name, kind, lay))

    def follow(self, node: fx.Node, module_name: str, kind: str, *, nonlinear: bool = False) -> None:
        """``module_name`` has per-channel parameters on the channels it passes through."""
        src = self.tensor_args(node)[0]
        self.passthrough(node, src, nonlinear=nonlinear)
        lay = self.layout(node)
        if lay is None or lay is not self.layout(src):
            return
        prev = self.module_io.get(module_name)
        if prev is not None and prev[0] is not None:
            self.merge(prev[0], lay, f"module {module_name} is called more than once")
            return
        self.follower_layouts[module_name] = lay
        for s, _ in lay.segs:
            self.followers[s].append((module_name, node.name, kind))

    def remember_module(self, module_name: str, node: fx.Node, src: fx.Node | None) -> None:
        """Remember a parametrised module's input/output layouts so repeated calls share channels."""
        if module_name not in self.module_io:
            self.module_io[module_name] = (self.layout(src), self.layout(node))
        else:
            prev_out = self.module_io[module_name][1]
            out = self.layout(node)
            if prev_out is not None and out is not None and prev_out is not out:
                self.merge(prev_out, out, f"module {module_name} is called more than once")


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{name}" if node.op != "call_method" else f".{target}()"


