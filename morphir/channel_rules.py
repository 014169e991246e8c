"""The built-in channel rules: how each known op moves channels.

Each rule is a function ``rule(ctx, node, module)`` (see :class:`morphir.channels.RuleContext`).
The public factories (:func:`passthrough`, :func:`follower`, :func:`blocking`) make rules for
new ops, e.g. a custom normalisation layer with per-channel parameters::

    rules = ChannelRules.default().with_module(MyNorm, follower("mynorm"))
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from morphir.rule_context import Rule, RuleContext, TensorChannels

__all__ = ["passthrough", "follower", "blocking", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES"]


# -- rule factories ------------------------------------------------------------------------------
def passthrough(*, nonlinear: bool) -> Rule:
    """A rule for an op that keeps its input's channels (an elementwise activation, a pool, dropout)."""

    def rule(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
        ctx.passthrough(node, nonlinear=nonlinear)

    return rule


def follower(kind: str, *, nonlinear: bool = False) -> Rule:
    """A rule for a module with per-channel parameters (index 0 of each parameter is the channel)."""

    def rule(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
        ctx.follow(node, str(node.target), kind, nonlinear=nonlinear)
        ctx.remember_module(str(node.target), node, ctx.tensor_args(node)[0])

    return rule


def blocking(reason: str) -> Rule:
    """A rule that keeps the layout but marks the channels as not growable for ``reason``."""

    def rule(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
        ctx.passthrough(node)
        ctx.block(ctx.layout(node), f"{reason} at node {node.name}")

    return rule


# -- layers ----------------------------------------------------------------------------------------
def _conv(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    assert isinstance(module, nn.modules.conv._ConvNd)
    name = str(node.target)
    src = ctx.tensor_args(node)[0]
    lay = ctx.layout(src)
    depthwise = module.groups == module.in_channels == module.out_channels and (
        module.groups > 1 or getattr(module, "morphir_depthwise", False)
    )
    if module.groups == 1 and not depthwise:
        if lay is not None and lay.axis != 1:
            ctx.block(lay, f"conv {name} at node {node.name} reads a tensor whose channels are not on axis 1")
        else:
            ctx.consume(node, src, name, "conv")
        ctx.produce(node, name, "conv", axis=1)
        ctx.remember_module(name, node, src)
    elif depthwise:
        ctx.follow(node, name, "depthwise")
        ctx.remember_module(name, node, src)
    else:
        ctx.unknown(node, f"grouped conv {name} (groups={module.groups}) at node {node.name} ties channels in blocks")


def _linear(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    name = str(node.target)
    src = ctx.tensor_args(node)[0]
    lay = ctx.layout(src)
    if lay is not None and lay.axis != lay.ndim - 1:
        # e.g. a network input whose channel axis was guessed: its features cannot grow, ours can
        ctx.block(lay, f"linear {name} at node {node.name} reads a tensor whose channels are not last")
    else:
        ctx.consume(node, src, name, "linear")
    shape = ctx.shape(node)
    ctx.produce(node, name, "linear", axis=(len(shape) - 1) if shape is not None else 1)
    ctx.remember_module(name, node, src)


def _prelu(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    assert isinstance(module, nn.PReLU)
    if module.num_parameters == 1:
        ctx.passthrough(node, nonlinear=True)
    else:
        follower("prelu", nonlinear=True)(ctx, node, module)


def _batch_norm(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """A batch norm, and a batch norm fused with its activation (a subclass holding ``act``, as
    timm's ``BatchNormAct2d``): per-channel parameters, nonlinear when it holds a nonlinearity."""
    nonlinear = module is not None and any(isinstance(m, tuple(_NONLINEAR_MODULES)) for m in module.modules())
    follower("batchnorm", nonlinear=nonlinear)(ctx, node, module)


def _instance_norm(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    if module.affine or module.track_running_stats:
        follower("instancenorm", nonlinear=True)(ctx, node, module)
    else:
        ctx.passthrough(node, nonlinear=True)


def _layer_norm(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    assert isinstance(module, nn.LayerNorm)
    ctx.passthrough(node, nonlinear=True)
    lay = ctx.layout(node)
    if lay is not None and lay.axis >= lay.ndim - len(module.normalized_shape):
        ctx.block(lay, f"LayerNorm {node.target} at node {node.name} normalises over the channels")


def _softmax_like(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    dim = getattr(module, "dim", None) if module is not None else _arg(node, 1, "dim", None)
    ctx.passthrough(node, nonlinear=True)
    lay = ctx.layout(node)
    if lay is not None and (dim is None or dim % lay.ndim == lay.axis):
        ctx.block(lay, f"softmax at node {node.name} mixes the channels")


# -- structural ops ----------------------------------------------------------------------------------
def _arg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _binary(*, nonlinear: bool) -> Rule:
    def rule(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
        tensors = ctx.tensor_args(node)
        out = ctx.shape(node)
        with_layout = [t for t in tensors if ctx.layout(t) is not None]
        if out is None or not with_layout:
            ctx.unknown(node, f"`{node.target}` at node {node.name} has no channel input")
            return
        full = [t for t in with_layout if ctx.layout(t).ndim == len(out) and ctx.width(ctx.layout(t)) == out[ctx.layout(t).axis]]
        if not full:
            ctx.unknown(node, f"`{node.name}` broadcasts along the channels")
            return
        base = ctx.layout(full[0])
        for other in tensors:
            if other is full[0]:
                continue
            lay = ctx.layout(other)
            shape = ctx.shape(other)
            if lay is not None and lay.ndim == base.ndim and ctx.width(lay) == ctx.width(base):
                ctx.merge(base, lay, f"{_name(node)} at node {node.name}")
                continue
            # a broadcast operand: fine if it has one entry along the channel axis
            aligned = len(out) - len(shape) if shape is not None else 0
            pos = base.axis - aligned
            if shape is not None and 0 <= pos < len(shape) and shape[pos] != 1:
                ctx.block(base, f"{_name(node)} at node {node.name} combines the channels with a per-channel tensor")
                ctx.block(lay, f"{_name(node)} at node {node.name} combines the channels with a per-channel tensor")
        if nonlinear and len(tensors) > 1:
            ctx.mark_nonlinear(base)
        ctx.set(node, base)

    return rule


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _cat(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    tensors = list(node.args[0]) if node.args else list(node.kwargs.get("tensors", []))
    dim = _arg(node, 1, "dim", 0)
    lays = [ctx.layout(t) for t in tensors]
    out = ctx.shape(node)
    if out is None or any(lay is None for lay in lays) or len({(lay.axis, lay.ndim) for lay in lays}) != 1:
        ctx.unknown(node, f"cat at node {node.name} joins tensors whose channels cannot be followed")
        return
    first = lays[0]
    if dim % first.ndim == first.axis:
        ctx.set(node, TensorChannels(first.axis, first.ndim, tuple(s for lay in lays for s in lay.segs)))
        return
    for lay in lays[1:]:
        ctx.merge(first, lay, f"cat along a non-channel axis at node {node.name}")
    ctx.set(node, first)


def _flatten_like(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """flatten / view / reshape: keep channels if the channel axis survives, expand it if it is flattened."""
    src = ctx.tensor_args(node)[0]
    lay, inp, out = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    if lay is None or inp is None or out is None:
        ctx.unknown(node, f"reshape at node {node.name} has no channel input")
        return
    axis = lay.axis
    if len(out) > axis and tuple(out[: axis + 1]) == tuple(inp[: axis + 1]):
        new = TensorChannels(axis, len(out), lay.segs)  # channels and everything before them untouched
    elif axis == 1 and len(out) == 2 and out[0] == inp[0] and out[1] == torch.Size(inp[1:]).numel():
        inner = int(torch.Size(inp[2:]).numel())
        new = TensorChannels(1, 2, tuple((s, i * inner) for s, i in lay.segs))
    else:
        ctx.unknown(node, f"reshape at node {node.name} from {tuple(inp)} to {tuple(out)} moves the channels")
        return
    _record_literal(ctx, node, new, out)
    ctx.set(node, new)


def _record_literal(ctx: RuleContext, node: fx.Node, lay: TensorChannels, out: torch.Size) -> None:
    """Remember a literal size on the channel axis of a view/reshape so a rewrite can update it."""
    is_view = node.op == "call_method" and node.target in ("view", "reshape")
    if not (is_view or node.target is torch.reshape):
        return
    dims = node.args[1:] if is_view else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims, path = tuple(dims[0]), (1, lay.axis)  # x.view((n, c)) / torch.reshape(x, (n, c))
    else:
        path = (lay.axis + 1,)  # x.view(n, c)
    if lay.axis < len(dims) and isinstance(dims[lay.axis], int) and dims[lay.axis] == out[lay.axis]:
        ctx.reshapes.append((node.name, path, lay))


def _reduce(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """mean / sum / amax over some dims: fine unless the channel axis is reduced."""
    src = ctx.tensor_args(node)[0]
    lay, out = ctx.layout(src), ctx.shape(node)
    dims = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if lay is None or out is None or dims is None:
        ctx.unknown(node, f"reduction at node {node.name} over every axis mixes the channels")
        return
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % lay.ndim for d in dims]
    if lay.axis in dims or 0 in dims:
        ctx.unknown(node, f"reduction at node {node.name} over dims {dims} mixes the channels or the batch")
        return
    axis = lay.axis if keepdim else lay.axis - sum(d < lay.axis for d in dims)
    if out[axis] != ctx.width(lay):
        ctx.unknown(node, f"reduction at node {node.name} changes the channel axis")
        return
    ctx.set(node, TensorChannels(axis, len(out), lay.segs))


def _permute(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    src = ctx.tensor_args(node)[0]
    lay = ctx.layout(src)
    if lay is None:
        ctx.unknown(node, f"permute at node {node.name} has no channel input")
        return
    if node.target in ("transpose",) or node.target is torch.transpose:
        a, b = (int(d) % lay.ndim for d in node.args[1:3])
        axis = b if lay.axis == a else a if lay.axis == b else lay.axis
    else:
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        axis = [int(d) % lay.ndim for d in dims].index(lay.axis)
    ctx.set(node, TensorChannels(axis, lay.ndim, lay.segs))


def _split_like(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """chunk / split: along the channels they cut a group, elsewhere every piece keeps the channels."""
    src = ctx.tensor_args(node)[0]
    lay = ctx.layout(src)
    dim = _arg(node, 2, "dim", 0)
    if lay is None:
        return
    if dim % lay.ndim == lay.axis:
        ctx.block(lay, f"{node.target} at node {node.name} cuts the channels into pieces")
        ctx.tuple_layouts[node.name] = []
    else:
        ctx.tuple_layouts[node.name] = [lay]


def _getitem(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    src = node.args[0]
    if isinstance(src, fx.Node) and src.name in ctx.tuple_layouts:
        pieces = ctx.tuple_layouts[src.name]
        if pieces:
            ctx.set(node, pieces[0])
        else:
            ctx.block(ctx.fresh(node, origin=f"piece of {src.name}"), f"a piece of the channels cut at {src.name}")
        return
    lay, out = ctx.layout(src), ctx.shape(node)
    if out is None:
        return
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    keeps_channels = lay is not None and len(out) == lay.ndim and all(
        i == slice(None) for i in index[: lay.axis + 1]
    ) and all(i is not Ellipsis and i is not None for i in index)
    if keeps_channels:
        ctx.passthrough(node, src)  # the index only narrows axes after the channels
    else:
        ctx.unknown(node, f"indexing at node {node.name} selects channels")


def _ignore(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """Ops that return Python values about a tensor (dim, dtype): no channels involved."""


def _size(ctx: RuleContext, node: fx.Node, module: nn.Module | None) -> None:
    """``x.shape`` / ``x.size()``: reading the batch or spatial sizes is harmless, but a channel count
    read as a number (``b, n, c = x.shape`` then ``reshape(b, n, c)`` of another tensor) is frozen into
    what the code computes from it, so that group cannot change width."""
    if node.op == "call_function" and not (len(node.args) > 1 and node.args[1] == "shape"):
        return  # another attribute (dtype, device, ndim)
    src = node.args[0]
    lay = ctx.layout(src)
    if lay is None:
        return
    why = f"its channel count is read as a number at node {node.name}"
    dim = _arg(node, 1, "dim", None) if node.op == "call_method" else None
    if dim is not None:
        if isinstance(dim, int) and dim % lay.ndim == lay.axis:
            ctx.block(lay, why)
        return
    for user in node.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if not isinstance(index, int) or index % lay.ndim == lay.axis:
            ctx.block(lay, why)
            return


# -- tables ----------------------------------------------------------------------------------------
_NONLINEAR_MODULES: Sequence[type] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.RReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_LINEAR_MODULES: Sequence[type] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
)

MODULE_RULES: dict[type, Rule] = {
    **{t: passthrough(nonlinear=True) for t in _NONLINEAR_MODULES},
    **{t: passthrough(nonlinear=False) for t in _LINEAR_MODULES},
    nn.modules.conv._ConvNd: _conv,
    nn.ConvTranspose1d: blocking("transposed conv"),
    nn.ConvTranspose2d: blocking("transposed conv"),
    nn.Linear: _linear,
    nn.modules.batchnorm._BatchNorm: _batch_norm,
    nn.modules.instancenorm._InstanceNorm: _instance_norm,
    nn.PReLU: _prelu,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: blocking("GroupNorm normalises groups of channels"),
    nn.Softmax: _softmax_like,
    nn.LogSoftmax: _softmax_like,
    nn.Flatten: _flatten_like,
}

_NONLINEAR_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.logsigmoid,
    F.softsign, torch.exp, torch.log, torch.abs, torch.sqrt, torch.square, torch.clamp, torch.clip,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)
_LINEAR_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate, operator.neg, torch.neg,
    operator.pos,
)

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: passthrough(nonlinear=True) for f in _NONLINEAR_FUNCTIONS},
    **{f: passthrough(nonlinear=False) for f in _LINEAR_FUNCTIONS},
    **{f: _binary(nonlinear=False) for f in (operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub)},
    **{f: _binary(nonlinear=True) for f in (operator.mul, operator.imul, operator.truediv, torch.mul, torch.div,
                                           torch.maximum, torch.minimum)},
    torch.cat: _cat,
    torch.concat: _cat,
    torch.concatenate: _cat,
    torch.flatten: _flatten_like,
    torch.reshape: _flatten_like,
    torch.mean: _reduce,
    torch.sum: _reduce,
    torch.amax: _reduce,
    torch.amin: _reduce,
    torch.permute: _permute,
    torch.transpose: _permute,
    torch.chunk: _split_like,
    torch.split: _split_like,
    operator.getitem: _getitem,
    F.softmax: _softmax_like,
    F.log_softmax: _softmax_like,
    torch.softmax: _softmax_like,
    F.layer_norm: blocking("layer_norm (functional) normalises over the channels"),
    F.group_norm: blocking("group_norm normalises groups of channels"),
    getattr: _size,
}

METHOD_RULES: dict[str, Rule] = {
    **{m: passthrough(nonlinear=True) for m in ("relu", "relu_", "sigmoid", "tanh", "exp", "log", "abs", "sqrt",
                                                "square", "clamp", "clip")},
    **{m: passthrough(nonlinear=False) for m in ("contiguous", "clone", "float", "double", "half", "to", "type_as",
                                                 "detach", "neg", "cpu", "cuda")},
    **{m: _binary(nonlinear=False) for m in ("add", "add_", "sub", "sub_")},
    **{m: _binary(nonlinear=True) for m in ("mul", "mul_", "div", "div_")},
    "flatten": _flatten_like,
    "view": _flatten_like,
    "reshape": _flatten_like,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "amin": _reduce,
    "permute": _permute,
    "transpose": _permute,
    "chunk": _split_like,
    "split": _split_like,
    "softmax": _softmax_like,
    "size": _size,
    "dim": _ignore,
}
