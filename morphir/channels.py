"""Channel analysis: which layers write and read the same channels.

The traced graph is turned into a graph of *channel spaces* (networkx): every tensor's channel axis
is a list of segments, each a run of channels of one space. Producers (conv, linear) open a new
space; pass-through ops (activations, batch norm, pooling, depthwise convs) keep it; an add, sub or
mul of two tensors ties their spaces together; a concat places spaces side by side; a flatten
expands each channel into ``inner`` features. The connected components of "same channels" edges
are the *coupled groups*: a morphism acts on a whole group, never on a lone layer.

>>> an = analyse(gm, ChannelRules.default())
>>> grp = an.groups["features.0"]
>>> grp.width, [p.module for p in grp.producers], [c.module for c in grp.consumers]

Ops whose channel semantics are unknown mark the groups they touch as not growable, with the
reason; they never make the analysis fail.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from morphir import channel_rules
from morphir.rule_context import Rule, RuleContext, TensorChannels, _describe

__all__ = [
    "Segment",
    "Layout",
    "Producer",
    "Follower",
    "Consumer",
    "ChannelGroup",
    "ChannelAnalysis",
    "ChannelRules",
    "RuleContext",
    "Rule",
    "analyse",
]

log = logging.getLogger(__name__)


# -- public results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A run of one group's channels inside a tensor's channel axis.

    Channel ``c`` of ``group`` occupies features ``offset + c*inner ... offset + (c+1)*inner - 1``.
    """

    group: str
    offset: int
    width: int
    inner: int = 1


@dataclass(frozen=True)
class Layout:
    """The channel axis of one tensor and the group segments laid along it."""

    axis: int
    ndim: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        """Number of features along the axis."""
        return sum(s.width * s.inner for s in self.segments)


@dataclass(frozen=True)
class Producer:
    """A module whose output channels (weight dim 0) are the group's channels."""

    module: str
    node: str
    kind: str


@dataclass(frozen=True)
class Follower:
    """A module with per-channel parameters on the group's channels (batch norm, depthwise conv)."""

    module: str
    node: str
    kind: str


@dataclass(frozen=True)
class Consumer:
    """A module reading the group's channels as input features (weight dim 1) at ``segment``."""

    module: str
    node: str
    kind: str
    segment: Segment


@dataclass(frozen=True)
class ChannelGroup:
    """Channels shared by every producer that writes them and every consumer that reads them.

    ``blocked`` lists why the group cannot grow or shrink (empty when it can); ``nonlinear`` says
    whether a nonlinearity acts on the channels (a split changes the function only then);
    ``unit`` is the granularity channels change in (1, or a head size for attention).

    Adding one channel costs ``params_per_channel + params_corner`` parameters, removing one saves
    ``params_per_channel - params_corner``: the corner is the weight a layer that both writes and
    reads the group (a shared conv, a block inside a residual stream) gains or loses at the
    crossing of its new row and column. FLOPs are per sample, 2 × multiply-accumulates.
    """

    def cost_of_adding(self, n: int = 1) -> tuple[int, int]:
        """``(Δparams, ΔFLOPs)`` of adding ``n`` channels (negative ``n``: removing)."""
        return (n * self.params_per_channel + n * n * self.params_corner,
                n * self.flops_per_channel + n * n * self.flops_corner)

    name: str
    width: int
    producers: tuple[Producer, ...]
    followers: tuple[Follower, ...]
    consumers: tuple[Consumer, ...]
    nodes: tuple[str, ...]
    blocked: tuple[str, ...]
    nonlinear: bool
    params_per_channel: int
    flops_per_channel: int
    params_corner: int = 0
    flops_corner: int = 0
    unit: int = 1

    @property
    def growable(self) -> bool:
        """True when morphisms may add or remove channels of this group."""
        return not self.blocked


@dataclass(frozen=True)
class ChannelAnalysis:
    """Result of :func:`analyse`: groups by name, every tensor node's layout, and the space graph."""

    groups: Mapping[str, ChannelGroup]
    layouts: Mapping[str, Layout]
    consumer_layouts: Mapping[str, Layout]
    follower_layouts: Mapping[str, Layout]
    reshapes: tuple[tuple[str, tuple[int, ...], Layout], ...]
    space_graph: nx.Graph
    space_group: Mapping[int, str]

    def group_of_node(self, node: str) -> list[str]:
        """Names of the groups carried by ``node``'s output."""
        lay = self.layouts.get(node)
        return [] if lay is None else list(dict.fromkeys(s.group for s in lay.segments))


# -- rule tables ---------------------------------------------------------------------------------
class ChannelRules:
    """Channel rules for module types, functions and tensor methods.

    Immutable: ``with_*`` returns an extended copy, so no module-level registry is ever mutated.

    >>> rules = ChannelRules.default().with_module(MyNorm, channel_rules.follower("mynorm"))
    >>> g = morphir.trace(model, x, rules=rules)
    """

    def __init__(
        self,
        modules: Mapping[type, Rule] | None = None,
        functions: Mapping[Any, Rule] | None = None,
        methods: Mapping[str, Rule] | None = None,
    ):
        self.modules = MappingProxyType(dict(modules or {}))
        self.functions = MappingProxyType(dict(functions or {}))
        self.methods = MappingProxyType(dict(methods or {}))

    @classmethod
    def default(cls) -> ChannelRules:
        """The built-in rules (see :mod:`morphir.channel_rules`)."""
        return cls(channel_rules.MODULE_RULES, channel_rules.FUNCTION_RULES, channel_rules.METHOD_RULES)

    def with_module(self, module_type: type, rule: Rule) -> ChannelRules:
        """A copy with ``rule`` for modules of ``module_type`` (and subclasses)."""
        return ChannelRules({**self.modules, module_type: rule}, self.functions, self.methods)

    def with_function(self, function: Any, rule: Rule) -> ChannelRules:
        """A copy with ``rule`` for ``call_function`` nodes whose target is ``function``."""
        return ChannelRules(self.modules, {**self.functions, function: rule}, self.methods)

    def with_method(self, method: str, rule: Rule) -> ChannelRules:
        """A copy with ``rule`` for tensor method calls named ``method``."""
        return ChannelRules(self.modules, self.functions, {**self.methods, method: rule})

    def rule_for(self, node: fx.Node, module: torch.nn.Module | None) -> Rule | None:
        """The rule that applies to ``node`` (None when the op is unknown)."""
        if node.op == "call_module" and module is not None:
            for klass in type(module).__mro__:
                if klass in self.modules:
                    return self.modules[klass]
            return None
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None


# -- the analysis --------------------------------------------------------------------------------
def analyse(gm: fx.GraphModule, rules: ChannelRules) -> ChannelAnalysis:
    """Find the coupled channel groups of a shape-propagated GraphModule.

    >>> an = analyse(g.module, ChannelRules.default())
    >>> sorted(an.groups)[:3]
    """
    ctx = RuleContext(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ctx.block(ctx.fresh(node, origin="network input"), "network input")
        elif node.op == "get_attr":
            continue  # constants carry no channel space of their own; rules that read them decide
        elif node.op == "output":
            for arg in ctx.tensor_args(node):
                ctx.block(ctx.layout(arg), "network output")
        else:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            rule = rules.rule_for(node, module)
            if rule is None:
                if ctx.shape(node) is None and not ctx.tensor_args(node):
                    continue  # a Python value (size, shape arithmetic): no channels involved
                what = f"module {node.target} ({type(module).__name__})" if module is not None else f"`{_describe(node)}`"
                ctx.unknown(node, f"{what} at node {node.name} has unknown channel semantics")
            else:
                rule(ctx, node, module)
    return _collect(gm, ctx)


def _collect(gm: fx.GraphModule, ctx: RuleContext) -> ChannelAnalysis:
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    components = sorted(
        (sorted(c) for c in nx.connected_components(ctx.space_graph)),
        key=lambda c: min(order[ctx.space_graph.nodes[s]["node"]] for s in c),
    )
    groups: dict[str, ChannelGroup] = {}
    space_group: dict[int, str] = {}
    pending: list[tuple[str, list[int]]] = []
    for comp in components:
        prods = sorted({p for s in comp for p in ctx.producers[s]}, key=lambda p: order[p[1]])
        name = prods[0][0] if prods else "@" + ctx.space_graph.nodes[comp[0]]["node"]
        while name in groups or name in dict(pending):
            name += "'"
        pending.append((name, comp))
        for s in comp:
            space_group[s] = name

    def to_layout(lay: TensorChannels) -> Layout:
        segs, off = [], 0
        for s, inner in lay.segs:
            segs.append(Segment(space_group[s], off, ctx.widths[s], inner))
            off += ctx.widths[s] * inner
        return Layout(lay.axis, lay.ndim, tuple(segs))

    consumer_layouts: dict[str, Layout] = {}
    consumers_of: dict[str, list[Consumer]] = defaultdict(list)
    for module_name, node_name, kind, lay in ctx.consumers:
        public = to_layout(lay)
        consumer_layouts[module_name] = public
        for seg in public.segments:
            consumers_of[seg.group].append(Consumer(module_name, node_name, kind, seg))

    follower_layouts = {m: to_layout(lay) for m, lay in ctx.follower_layouts.items()}
    for name, comp in pending:
        widths = {ctx.widths[s] for s in comp}
        reasons = list(dict.fromkeys(r for s in comp for r in ctx.reasons[s]))
        if len(widths) != 1:
            reasons.append(f"spaces of different widths {sorted(widths)} were tied together")
        prods = tuple(
            Producer(*p) for p in sorted({p for s in comp for p in ctx.producers[s]}, key=lambda p: order[p[1]])
        )
        if not prods and not reasons:
            reasons.append("no layer writes these channels")
        folls = tuple(
            Follower(*f) for f in sorted({f for s in comp for f in ctx.followers[s]}, key=lambda f: order[f[1]])
        )
        cons = tuple(dict.fromkeys(consumers_of[name]))
        nodes = tuple(sorted({n for s in comp for n in ctx.carriers[s]}, key=order.__getitem__))
        width = min(widths)
        counts = {
            f.module: sum(seg.group == name for seg in follower_layouts[f.module].segments) for f in folls
        }
        params, flops, corner_params, corner_flops = _per_channel_cost(gm, prods, folls, cons, counts)
        groups[name] = ChannelGroup(
            name=name,
            width=width,
            producers=prods,
            followers=folls,
            consumers=cons,
            nodes=nodes,
            blocked=tuple(reasons),
            nonlinear=any(s in ctx.nonlinear_spaces for s in comp),
            params_per_channel=params,
            flops_per_channel=flops,
            params_corner=corner_params,
            flops_corner=corner_flops,
        )
    layouts = {n: to_layout(lay) for n, lay in ctx.layouts.items()}
    reshapes = tuple((n, path, to_layout(lay)) for n, path, lay in ctx.reshapes)
    return ChannelAnalysis(
        groups=MappingProxyType(groups),
        layouts=MappingProxyType(layouts),
        consumer_layouts=MappingProxyType(consumer_layouts),
        follower_layouts=MappingProxyType(follower_layouts),
        reshapes=reshapes,
        space_graph=ctx.space_graph,
        space_group=MappingProxyType(space_group),
    )


def _positions(gm: fx.GraphModule, node: fx.Node) -> int:
    """Output positions per sample and channel of a layer's call (H·W for a conv, L for a linear on N×L×C)."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata) or len(meta.shape) < 2:
        return 1
    shape = meta.shape
    channels = shape[-1] if isinstance(gm.get_submodule(node.target), torch.nn.Linear) else shape[1]
    return int(torch.Size(shape[1:]).numel()) // max(int(channels), 1)


def _per_channel_cost(
    gm: fx.GraphModule,
    prods: tuple[Producer, ...],
    folls: tuple[Follower, ...],
    cons: tuple[Consumer, ...],
    follower_counts: Mapping[str, int],
) -> tuple[int, int, int, int]:
    """Linear and corner parts of the parameters and FLOPs (2 × MACs per sample) of one channel."""
    nodes = {n.name: n for n in gm.graph.nodes}
    params = flops = 0
    for p in prods:
        m = gm.get_submodule(p.module)
        row = int(m.weight[0].numel())
        params += row + (1 if getattr(m, "bias", None) is not None else 0)
        flops += 2 * row * _positions(gm, nodes[p.node])
    for f in folls:
        m = gm.get_submodule(f.module)
        times = follower_counts.get(f.module, 1)  # a follower after cat([h, h]) carries the group twice
        per = times * sum(int(t[0].numel()) for t in m.parameters(recurse=False) if t.dim() >= 1)
        params += per
        weight = getattr(m, "weight", None)
        per_flop = int(weight[0].numel()) if weight is not None and weight.dim() > 1 else 1
        flops += 2 * times * per_flop * _positions(gm, nodes[f.node])
    corner_params = corner_flops = 0
    producing = {p.module for p in prods}
    for c in cons:
        m = gm.get_submodule(c.module)
        per = int(m.weight[:, :1].numel()) * c.segment.inner
        params += per
        flops += 2 * per * _positions(gm, nodes[c.node])
        if c.module in producing:  # the new row meets the new column
            corner = int(m.weight[0, 0].numel()) * c.segment.inner
            corner_params += corner
            corner_flops += 2 * corner * _positions(gm, nodes[c.node])
    return params, flops, corner_params, corner_flops

