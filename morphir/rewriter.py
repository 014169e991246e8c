"""The rewriter: morphisms record edits here, the engine applies them all in one pass.

Two kinds of edits:

* **channel edits** on a coupled group: each old channel becomes zero, one or several *copies*;
  a copy adds a delta to the producers' incoming weights and scales what consumers read from it.
  A split is two copies ``(+θ, ½)`` and ``(−θ, ½)``; a prune is zero copies.
* **insertions** of new layers after a node, in sequence or as a residual branch.

Insertions are applied first, then every channel edit at once: one index-select per affected
parameter, so the cost is linear in the number of edits.

>>> rw.split("features.0", 3, delta={"features.0.0": theta_row})
>>> rw.remove("features.1", 0)
>>> rw.insert_after("relu_2", [("conv", conv), ("act", nn.ReLU())], residual=False)
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from morphir.channels import ChannelAnalysis, Layout
from morphir.errors import InvariantError, MorphismError, TraceError

__all__ = ["ChannelCopy", "ParamEdit", "Rewriter", "batch_norm_after"]

log = logging.getLogger(__name__)

_FOLD_RTOL = 1e-6


@dataclass(frozen=True)
class ChannelCopy:
    """One copy of an old channel: ``delta`` is added to each producer's incoming weights
    (keyed by producer module name; missing producers get no delta), ``scale`` multiplies
    the consumers' weights that read the copy.

    Two optional overrides build channels that are not scaled copies (a new neuron):
    ``rows`` sets per-channel values of the copy in producers and followers
    (``{module: {tensor name: value}}``, e.g. a batch norm's ``bias`` and ``running_mean``);
    ``outgoing`` sets what each consumer reads from the copy (``{consumer module: value}``, the
    value of ``weight[:, features of the copy]``, shape ``(out, inner, *kernel)``), replacing the
    scaled copy.

    >>> ChannelCopy(delta={"fc1": v - w}, scale=0.0)   # a new channel: incoming v, outgoing 0
    """

    delta: Mapping[str, torch.Tensor] | None = None
    scale: float = 1.0
    rows: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    outgoing: Mapping[str, torch.Tensor] | None = None


_KEEP = (ChannelCopy(),)


@dataclass(frozen=True)
class ParamEdit:
    """How a parameter after a rewrite derives from the same-named parameter before it.

    Its rows (dim 0) are the old rows at ``rows``; then its columns (dim 1) are the old columns at
    ``cols``, each scaled by ``col_scale``. None: that dim is unchanged. Anything else a rewrite
    adds (a split's ±θ, a folded bias) is a value change only. Optimizer state follows the same
    map (see :func:`morphir.carry_state`).
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None

    def then(self, other: "ParamEdit") -> "ParamEdit":
        """This edit followed by ``other`` (rows then columns compose independently)."""
        rows = self.rows if other.rows is None else (other.rows if self.rows is None else self.rows[other.rows])
        if other.cols is None:
            cols, scale = self.cols, self.col_scale
        elif self.cols is None:
            cols, scale = other.cols, other.col_scale
        else:
            cols, scale = self.cols[other.cols], self.col_scale[other.cols] * other.col_scale
        return ParamEdit(rows, cols, scale)


@dataclass(frozen=True)
class _Insert:
    node: str
    modules: tuple[tuple[str, nn.Module], ...]
    residual: bool
    origin: str


@dataclass
class _Plan:
    """New channels of one group: new channel j copies old channel ``src[j]``."""

    old_width: int
    src: torch.Tensor
    scale: torch.Tensor
    deltas: list[tuple[int, Mapping[str, torch.Tensor]]]
    removed: list[int]
    overrides: list[tuple[int, ChannelCopy]] = field(default_factory=list)  # copies with rows/outgoing


def batch_norm_after(graph, group: str) -> str | None:
    """The batch norm that alone reads the output of ``group``'s single producer, by module name;
    None when the group has several producers or anything else reads the producer.

    Such a batch norm normalises each channel, so scaling a channel's incoming weights (and the
    batch norm's running statistics alike) changes nothing downstream: only the channel's
    effective learning rate, lr/‖w‖², which is what :meth:`Rewriter.split` uses it for.

    >>> batch_norm_after(g, "features.0.0")
    'features.0.1'
    """
    grp = graph.group(group)
    if len(grp.producers) != 1:
        return None
    users = list(graph.node(grp.producers[0].node).users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    name = str(users[0].target)
    return name if isinstance(graph.submodule(name), nn.modules.batchnorm._BatchNorm) else None


class Rewriter:
    """Collects the edits of one rewrite of ``graph`` (a working copy owned by the engine).

    Morphisms read the graph (``rw.graph``: groups, weights, shapes) and call the recording
    methods; nothing changes until the engine applies the edits.
    """

    def __init__(self, graph):
        self.graph = graph
        self._channels: dict[tuple[str, int], tuple[tuple[ChannelCopy, ...], str]] = {}
        self._inserts: list[_Insert] = []
        self.param_edits: dict[str, ParamEdit] = {}  # filled by apply(): qualified name -> edit

    # -- recording ---------------------------------------------------------------------------
    def set_copies(self, group: str, channel: int, copies: Sequence[ChannelCopy], origin: str) -> None:
        """Replace ``channel`` of ``group`` by ``copies`` (empty: remove it). ``origin`` names the site."""
        grp = self.graph.group(group)
        if not grp.growable:
            raise MorphismError(f"{origin}: group {group!r} cannot change width: {'; '.join(grp.blocked)}")
        if not 0 <= channel < grp.width:
            raise MorphismError(f"{origin}: channel {channel} is outside group {group!r} of width {grp.width}")
        key = (group, channel)
        if key in self._channels:
            raise MorphismError(
                f"{origin} and {self._channels[key][1]} both edit channel {channel} of group {group!r}; "
                "apply them in separate rewrites"
            )
        self._channels[key] = (tuple(copies), origin)

    def split(self, group: str, channel: int, delta: Mapping[str, torch.Tensor] | None = None, *,
              scales: tuple[float, float] = (1.0, 1.0), origin: str = "split") -> None:
        """Split ``channel`` in two: incoming weights ``w + delta`` and ``w − delta``, outgoing halved.

        ``scales`` (s₁, s₂): the copies' incoming weights become s₁(w + delta) and s₂(w − delta),
        with the batch norm that directly follows the group's producer (see
        :func:`batch_norm_after`) given running statistics scaled alike, so nothing downstream
        changes (exactly in eval mode; in train mode up to the batch norm's ε).
        """
        self.split_channels(group, [channel], [delta], [scales], [origin])

    def split_channels(self, group: str, channels: Sequence[int], deltas: Sequence[Mapping[str, torch.Tensor] | None],
                       scales: Sequence[tuple[float, float]], origins: Sequence[str]) -> None:
        """:meth:`split` of several channels of one group, their rescaled copies computed together.

        >>> rw.split_channels("features.0.0", [0, 3], [None, None], [(0.5, 0.25), (0.4, 0.2)], ["a", "b"])
        """
        plain = [k for k, sc in enumerate(scales) if tuple(sc) == (1.0, 1.0)]
        for k in plain:
            d = deltas[k]
            neg = None if d is None else {m: -v for m, v in d.items()}
            self.set_copies(group, channels[k], (ChannelCopy(d, 0.5), ChannelCopy(neg, 0.5)), origins[k])
        scaled = [k for k in range(len(channels)) if tuple(scales[k]) != (1.0, 1.0)]
        if not scaled:
            return
        bn_name = batch_norm_after(self.graph, group)
        if bn_name is None:
            raise MorphismError(f"{origins[scaled[0]]}: the copies of a channel of group {group!r} can be rescaled only "
                                "when a batch norm directly follows its single producer")
        producer = self.graph.group(group).producers[0].module
        conv, bn = self.graph.submodule(producer), self.graph.submodule(bn_name)
        for k in scaled:
            if not all(sc > 0 for sc in scales[k]):
                raise MorphismError(f"{origins[k]}: a copy's scale must be positive, got {min(scales[k])}")
        index = torch.as_tensor([channels[k] for k in scaled], dtype=torch.long)
        s = torch.tensor([list(scales[k]) for k in scaled], dtype=torch.float64)  # (n, 2): s₁, s₂
        w = conv.weight.detach()[index]
        stats = bn.track_running_stats and bn.running_mean is not None
        if stats:
            # (s·x − s·μ) / √(s²(σ² + ε) − ε + ε) = (x − μ) / √(σ² + ε), in the statistics' own dtype
            sv = s.to(bn.running_var.dtype)
            var = (bn.running_var.detach()[index][:, None] + bn.eps) * sv * sv - bn.eps
            bad = (var <= 0).any(dim=1).nonzero().flatten().tolist()
            if bad:
                k = scaled[bad[0]]
                raise MorphismError(f"{origins[k]}: scale {min(scales[k])} is too small for the batch norm {bn_name!r} of "
                                    f"channel {channels[k]} (its running variance would not stay positive)")
            mean = bn.running_mean.detach()[index][:, None] * s.to(bn.running_mean.dtype)
        bias = getattr(conv, "bias", None)
        if bias is not None:
            new_bias = bias.detach()[index][:, None] * s.to(bias.dtype)
        # (s − 1)·w for every copy at once; θ's part only where there is one
        base = (s - 1.0).to(w.dtype).reshape(*s.shape, *(1,) * (w.dim() - 1)) * w[:, None]
        for row, k in enumerate(scaled):
            d = deltas[k]
            d = None if d is None else d.get(producer)
            copies = []
            for col, sign in enumerate((1.0, -1.0)):
                rows: dict[str, dict[str, torch.Tensor]] = {}
                if bias is not None:
                    rows[producer] = {"bias": new_bias[row, col:col + 1]}
                if stats:
                    rows[bn_name] = {"running_mean": mean[row, col:col + 1], "running_var": var[row, col:col + 1]}
                change = base[row, col] if d is None else base[row, col] + sign * float(s[row, col]) * d.to(w)
                copies.append(ChannelCopy({producer: change}, 0.5, rows=rows or None))
            self.set_copies(group, channels[k], tuple(copies), origins[k])

    def remove(self, group: str, channel: int, *, origin: str = "remove") -> None:
        """Remove ``channel``; the constant it would output with zero incoming weights is folded
        into the consumers' biases where that is exact."""
        self.set_copies(group, channel, (), origin)

    def perturb(self, group: str, channel: int, delta: Mapping[str, torch.Tensor], *, origin: str = "perturb") -> None:
        """Add ``delta`` to the incoming weights of ``channel`` (its width stays)."""
        self.set_copies(group, channel, (ChannelCopy(delta, 1.0),), origin)

    def insert_after(
        self, node: str, modules: Sequence[tuple[str, nn.Module]], *, residual: bool, origin: str = "insert"
    ) -> None:
        """Insert ``modules`` as a chain after ``node``: ``y = chain(x)``, or ``y = x + chain(x)``
        when ``residual``. Each module is registered as ``{node}_{suffix}`` (made unique)."""
        self.graph.node(node)  # raises if missing
        if not modules:
            raise MorphismError(f"{origin}: nothing to insert after {node!r}")
        self._inserts.append(_Insert(node, tuple(modules), residual, origin))

    def folds_exactly(self, group: str, channel: int) -> bool:
        """Whether removing ``channel`` of ``group`` would fold its constant into every consumer exactly,
        i.e. the removal itself changes nothing once the channel's incoming weights are zero."""
        grp = self.graph.group(group)
        plan = _Plan(grp.width, torch.arange(grp.width), torch.ones(grp.width), [], [channel])
        corrections = _folded_biases(self.graph, self.graph.analysis, {group: plan})
        return all(c.module in corrections for c in grp.consumers)

    @property
    def edited_groups(self) -> frozenset[str]:
        """The groups whose channels the recorded edits change (what the θ = 0 check skips)."""
        return frozenset(group for group, _ in self._channels)

    @property
    def empty(self) -> bool:
        """True when nothing has been recorded."""
        return not self._channels and not self._inserts

    # -- applying ----------------------------------------------------------------------------
    def apply(self) -> None:
        """Apply every recorded edit to ``self.graph`` (engine use)."""
        if self._inserts:
            _apply_inserts(self.graph, self._inserts)
            self._refresh(sorted({i.origin for i in self._inserts}))
        if self._channels:
            _apply_channel_edits(self.graph, self._plans(), self.param_edits)
            self._refresh(sorted({origin for _, origin in self._channels.values()}))

    def _refresh(self, origins: list[str]) -> None:
        self.graph.invalidate()
        try:
            self.graph.propagate_shapes()
        except TraceError as exc:
            shown = ", ".join(origins[:5]) + (", ..." if len(origins) > 5 else "")
            raise InvariantError(f"the rewrite by {shown} produced a graph that does not run: {exc.__cause__}") from exc

    def _plans(self) -> dict[str, _Plan]:
        by_group: dict[str, dict[int, tuple[ChannelCopy, ...]]] = defaultdict(dict)
        origins: dict[str, str] = {}
        for (group, channel), (copies, origin) in self._channels.items():
            by_group[group][channel] = copies
            origins.setdefault(group, origin)
        plans = {}
        for group, edits in by_group.items():
            grp = self.graph.group(group)
            src: list[int] = []
            scale: list[float] = []
            deltas: list[tuple[int, Mapping[str, torch.Tensor]]] = []
            removed: list[int] = []

            overrides: list[tuple[int, ChannelCopy]] = []

            def add(c: int, cp: ChannelCopy) -> None:
                if cp.delta:
                    deltas.append((len(src), cp.delta))
                if cp.rows or cp.outgoing:
                    overrides.append((len(src), cp))
                src.append(c)
                scale.append(cp.scale)

            extra: list[tuple[int, ChannelCopy]] = []
            for c in range(grp.width):
                copies = edits.get(c, _KEEP)
                if not copies:
                    removed.append(c)
                    continue
                add(c, copies[0])  # the first copy keeps the channel's index
                extra.extend((c, cp) for cp in copies[1:])
            for c, cp in extra:  # further copies are appended after the old channels
                add(c, cp)
            if not src:
                raise MorphismError(
                    f"{origins[group]}: the rewrite would remove every channel of group {group!r}; keep at least one"
                )
            plans[group] = _Plan(grp.width, torch.tensor(src), torch.tensor(scale), deltas, removed, overrides)
        return plans


# -- insertions ----------------------------------------------------------------------------------
def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}{k}"
    return name


def _apply_inserts(graph, inserts: Sequence[_Insert]) -> None:
    gm: fx.GraphModule = graph.module
    for ins in inserts:
        anchor = graph.node(ins.node)
        created: list[fx.Node] = []
        with gm.graph.inserting_after(anchor):
            prev = anchor
            for suffix, module in ins.modules:
                name = _unique_name(gm, f"{ins.node}_{suffix}")
                gm.add_submodule(name, module)
                with gm.graph.inserting_after(prev):
                    prev = gm.graph.call_module(name, (prev,))
                created.append(prev)
            if ins.residual:
                with gm.graph.inserting_after(prev):
                    prev = gm.graph.call_function(operator.add, (anchor, prev))
                created.append(prev)
        keep = set(created)
        anchor.replace_all_uses_with(prev, delete_user_cb=lambda user: user not in keep)
        for n in created:
            n.meta["morphir.created_by"] = ins.origin
    gm.graph.lint()
    gm.recompile()


# -- channel edits -------------------------------------------------------------------------------
def _index(layout: Layout, plans: Mapping[str, _Plan]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Feature index and scale along ``layout`` after the plans; None when no segment changes."""
    if not any(seg.group in plans for seg in layout.segments):
        return None
    idx_parts, scale_parts = [], []
    for seg in layout.segments:
        plan = plans.get(seg.group)
        if plan is None:
            n = seg.width * seg.inner
            idx_parts.append(torch.arange(seg.offset, seg.offset + n))
            scale_parts.append(torch.ones(n))
        else:
            base = plan.src * seg.inner + seg.offset
            idx_parts.append((base[:, None] + torch.arange(seg.inner)).reshape(-1))
            scale_parts.append(plan.scale.repeat_interleave(seg.inner))
    return torch.cat(idx_parts), torch.cat(scale_parts)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        module._buffers[name] = value


def _record(edits: dict[str, ParamEdit], name: str, edit: ParamEdit) -> None:
    edits[name] = edits[name].then(edit) if name in edits else edit


def _edit_rows(module: nn.Module, idx: torch.Tensor, old: int, *, follower: bool,
               prefix: str = "", edits: dict[str, ParamEdit] | None = None) -> None:
    """Index every per-channel tensor of ``module`` along dim 0 and update its size attributes.

    A follower conv is depthwise: its input channels and groups follow its output channels.
    """
    with torch.no_grad():
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and t.dim() >= 1 and t.shape[0] == old:
                _replace(module, name, t.detach()[idx.to(t.device)].clone())
                if edits is not None and name in module._parameters:
                    _record(edits, prefix + name, ParamEdit(rows=idx))
    new = int(idx.numel())
    for attr in ("out_channels", "out_features", "num_features", "num_parameters"):
        if getattr(module, attr, None) == old:
            setattr(module, attr, new)
    if follower and isinstance(module, nn.modules.conv._ConvNd):
        module.groups = module.in_channels = new
        # at width 1 a depthwise conv looks dense (groups == 1): remember its role for the analysis
        module.morphir_depthwise = True


def _edit_cols(module: nn.Module, idx: torch.Tensor, scale: torch.Tensor, *,
               prefix: str = "", edits: dict[str, ParamEdit] | None = None) -> None:
    w = module.weight.detach()
    view = (1, -1) + (1,) * (w.dim() - 2)
    _replace(module, "weight", (w[:, idx.to(w.device)] * scale.to(w).view(view)).contiguous())
    if edits is not None:
        _record(edits, prefix + "weight", ParamEdit(cols=idx, col_scale=scale))
    new = int(idx.numel())
    if isinstance(module, nn.Linear):
        module.in_features = new
    else:
        module.in_channels = new


def _linear_part(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The module's output without bias, and its channel axis."""
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight), -1
    return module._conv_forward(x, module.weight, None), 1


@torch.no_grad()
def _folded_biases(graph, an: ChannelAnalysis, plans: Mapping[str, _Plan]) -> dict[str, torch.Tensor]:
    """Bias corrections for consumers of removed channels, where the removed contribution is constant.

    A removed channel behaves as if its incoming weights were zero: it outputs a constant that
    flows through the per-channel ops to its consumers. Run the probe batch with those weights
    zeroed, take each consumer's input restricted to the removed features, and fold the resulting
    output into the bias when it is the same for every sample and position.
    """
    removing = {g: p for g, p in plans.items() if p.removed}
    if not removing:
        return {}
    gm = graph.module
    saved: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    for g, plan in removing.items():
        for prod in an.groups[g].producers:
            w = gm.get_submodule(prod.module).weight
            rows = torch.tensor(plan.removed, device=w.device)
            saved.append((w, rows, w.data[rows].clone()))
            w.data[rows] = 0
    consumers = {c.module for g in removing for c in an.groups[g].consumers}
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        gm.get_submodule(m).register_forward_pre_hook(lambda mod, args, m=m: captured.setdefault(m, args[0]))
        for m in consumers
    ]
    try:
        graph.run_probe(graph.probe_inputs)  # explicit inputs: never the cached output, the hooks must fire
    finally:
        for h in hooks:
            h.remove()
        for w, rows, value in saved:
            w.data[rows] = value
    corrections = {}
    for m in consumers:
        module, x = gm.get_submodule(m), captured.get(m)
        layout = an.consumer_layouts[m]
        if x is None:
            continue
        mask = torch.zeros(layout.size, dtype=x.dtype, device=x.device)
        for seg in layout.segments:
            plan = removing.get(seg.group)
            if plan is not None:
                for c in plan.removed:
                    start = seg.offset + c * seg.inner
                    mask[start : start + seg.inner] = 1
        view = [1] * x.dim()
        view[layout.axis] = -1
        out, axis = _linear_part(module, x * mask.view(view))
        flat = out.movedim(axis, 0).reshape(out.shape[axis], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        if bool(torch.all(hi - lo <= _FOLD_RTOL * (1 + flat.abs().max()))):
            corrections[m] = flat.mean(dim=1)
        else:
            log.debug("removed channels feed %s a non-constant signal; nothing folded", m)
    return corrections


def _new_offsets(layout: Layout, plans: Mapping[str, _Plan], group: str) -> list[tuple[int, int]]:
    """``(new offset, inner)`` of every segment of ``group`` along ``layout`` after the plans."""
    out, offset = [], 0
    for seg in layout.segments:
        if seg.group == group:
            out.append((offset, seg.inner))
        width = int(plans[seg.group].src.numel()) if seg.group in plans else seg.width
        offset += width * seg.inner
    return out


def _set_rows(module: nn.Module, name: str, items: Sequence[tuple[int, int, torch.Tensor, str]]) -> None:
    """Set ``module.<name>[start:start + length] = value`` for every ``(start, length, value, origin)``."""
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise MorphismError(f"{items[0][3]}: {type(module).__name__} has no tensor {name!r} to set")
    per_row = t.shape[1:].numel()
    index, values = [], []
    for start, length, value, origin in items:
        if start + length > t.shape[0] or value.numel() != length * per_row:
            raise MorphismError(f"{origin}: {name} of a channel has {length * per_row} values, got {value.numel()}")
        index.extend(range(start, start + length))
        values.append(value.reshape(length, *t.shape[1:]))
    t.data[torch.as_tensor(index, dtype=torch.long)] = torch.cat(values).to(t)


def _apply_overrides(gm: fx.GraphModule, an: ChannelAnalysis, plans: Mapping[str, _Plan]) -> None:
    """Set the per-channel values and outgoing weights of copies that override them."""
    produced = {p.module: g for g in plans for p in an.groups[g].producers}
    # per-channel values, gathered per (module, tensor) and written with one indexed assignment each
    rows: dict[tuple[str, str], list[tuple[int, int, torch.Tensor, str]]] = defaultdict(list)
    for gname, plan in plans.items():
        if not plan.overrides:
            continue
        grp = an.groups[gname]
        producers = {p.module for p in grp.producers}
        places: dict[str, list[tuple[int, int]]] = {}
        for j, cp in plan.overrides:
            origin = f"new channel {j} of group {gname!r}"
            for mod_name, values in (cp.rows or {}).items():
                if mod_name not in places:
                    if mod_name in producers:
                        places[mod_name] = [(0, 1)]
                    else:
                        layout = an.follower_layouts.get(mod_name)
                        if layout is None:
                            raise MorphismError(f"{origin}: {mod_name!r} is neither a producer nor a follower of the group")
                        # a follower may carry the group more than once (after cat([h, h])): set every place
                        places[mod_name] = _new_offsets(layout, plans, gname)
                for offset, inner in places[mod_name]:
                    for name, value in values.items():
                        rows[(mod_name, name)].append((offset + j * inner, inner, value, origin))
    for (mod_name, name), items in rows.items():
        _set_rows(gm.get_submodule(mod_name), name, items)
    for gname, plan in plans.items():
        for j, cp in plan.overrides:
            origin = f"new channel {j} of group {gname!r}"
            for mod_name, value in (cp.outgoing or {}).items():
                layout = an.consumer_layouts.get(mod_name)
                places = [] if layout is None else _new_offsets(layout, plans, gname)
                if not places:
                    raise MorphismError(f"{origin}: {mod_name!r} does not read the group")
                w = gm.get_submodule(mod_name).weight
                rows = produced.get(mod_name)
                if rows is not None and value.shape[0] == plans[rows].old_width:
                    value = value[plans[rows].src.to(value.device)].clone()  # the consumer's own rows changed too
                    for k, _ in plans[rows].overrides:  # a new neuron there reads no other new neuron
                        value[k] = 0
                reads = sum(inner for _, inner in places)
                if value.dim() < 2 or value.shape[0] != w.shape[0] or value.shape[1] != reads or \
                        tuple(value.shape[2:]) != tuple(w.shape[2:]):
                    raise MorphismError(f"{origin}: {mod_name} reads {(w.shape[0], reads, *w.shape[2:])} weights from "
                                        f"a channel, got {tuple(value.shape)}")
                taken = 0
                for offset, inner in places:  # the value's blocks, in the order the module reads the group
                    start = offset + j * inner
                    w.data[:, start:start + inner] = value[:, taken:taken + inner].to(w)
                    taken += inner


def _apply_channel_edits(graph, plans: Mapping[str, _Plan], edits: dict[str, ParamEdit] | None = None) -> None:
    gm: fx.GraphModule = graph.module
    an: ChannelAnalysis = graph.analysis
    biases = _folded_biases(graph, an, plans)

    with torch.no_grad():
        # fold first: a consumer may also be a producer whose rows the plans re-index below
        for m, correction in biases.items():
            module = gm.get_submodule(m)
            if module.bias is None:
                module.bias = nn.Parameter(correction.to(module.weight))
            else:
                module.bias += correction.to(module.bias)
        for gname, plan in plans.items():
            grp = an.groups[gname]
            for prod in grp.producers:
                module = gm.get_submodule(prod.module)
                _edit_rows(module, plan.src, plan.old_width, follower=False, prefix=prod.module + ".", edits=edits)
                for j, delta in plan.deltas:
                    if prod.module in delta:
                        module.weight[j] += delta[prod.module].to(module.weight)
        for m, layout in an.follower_layouts.items():
            found = _index(layout, plans)
            if found is not None:
                _edit_rows(gm.get_submodule(m), found[0], layout.size, follower=True, prefix=m + ".", edits=edits)
        for m, layout in an.consumer_layouts.items():
            found = _index(layout, plans)
            if found is not None:
                _edit_cols(gm.get_submodule(m), *found, prefix=m + ".", edits=edits)
        _apply_overrides(gm, an, plans)

    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, path, layout in an.reshapes:
        if any(seg.group in plans for seg in layout.segments):
            size = sum(
                (int(plans[s.group].src.numel()) if s.group in plans else s.width) * s.inner for s in layout.segments
            )
            node = nodes[node_name]
            args = list(node.args)
            if len(path) == 1:
                args[path[0]] = size
            else:
                inner = list(args[path[0]])
                inner[path[1]] = size
                args[path[0]] = type(node.args[path[0]])(inner)
            node.args = tuple(args)
    gm.graph.lint()
    gm.recompile()
