"""Splitting steepest descent's σ'': exact for smooth activations (elementwise, by autograd), a
Gaussian kernel at each kink for kinked ones (ReLU and its kin; see :mod:`morphir.passes.s2d`).

>>> second_derivative(nn.ReLU(), u, bandwidth=h)   # φ_h(u): the kernel at the kink
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from morphir.api import MorphGraph, MorphirError

__all__ = ["second_derivative"]

# -- activations: σ'' as a smooth part plus Dirac kinks ------------------------------------------------
@dataclass(frozen=True)
class _Activation:
    """An elementwise activation: ``fn`` (None: piecewise linear, no smooth σ'') and its kinks
    ``(location, jump of σ')`` (a jump may be a per-channel tensor)."""

    fn: Callable[[torch.Tensor], torch.Tensor] | None
    kinks: tuple[tuple[float, float | torch.Tensor], ...]


_SMOOTH_MODULES = (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus,
                   nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Hardswish, nn.Hardsigmoid)


_SMOOTH_FUNCTIONS = (F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh,
                     F.softplus, F.softsign, F.logsigmoid, F.hardswish, F.hardsigmoid)


_SMOOTH_METHODS = ("sigmoid", "tanh")


_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)  # identity in eval


def _arg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _module_kinks(m: nn.Module) -> tuple[tuple[float, Any], ...] | None:
    if isinstance(m, nn.ReLU):
        return ((0.0, 1.0),)
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return ((float(m.min_val), 1.0), (float(m.max_val), -1.0))
    if isinstance(m, nn.LeakyReLU):
        return ((0.0, 1.0 - m.negative_slope),)
    if isinstance(m, nn.RReLU):  # eval mode: the mean slope
        return ((0.0, 1.0 - (m.lower + m.upper) / 2),)
    if isinstance(m, nn.PReLU):
        return ((0.0, 1.0 - m.weight.detach()),)
    if isinstance(m, nn.ELU):
        return ((0.0, 1.0 - m.alpha),) if m.alpha != 1.0 else ()
    if isinstance(m, nn.SELU):
        return ((0.0, 1.0507009873554805 * (1.0 - 1.6732632423543772)),)
    if isinstance(m, nn.Hardsigmoid):
        return ((-3.0, 1 / 6), (3.0, -1 / 6))
    if isinstance(m, nn.Hardswish):
        return ((-3.0, -0.5), (3.0, -0.5))
    if isinstance(m, _SMOOTH_MODULES):
        return ()
    return None


def _activation(graph: MorphGraph, node: fx.Node, source: fx.Node) -> _Activation | None:
    """The activation computed by ``node`` on ``source`` (its first argument), or None if it is not
    a known elementwise activation of one tensor."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module":
        m = graph.submodule(str(node.target))
        kinks = _module_kinks(m)
        if kinks is None:
            return None
        if isinstance(m, _SMOOTH_MODULES):
            m = copy.copy(m)
            if hasattr(m, "inplace"):
                m.inplace = False
            return _Activation(m, kinks)
        return _Activation(None, kinks)
    if node.op == "call_function":
        t = node.target
        if t in (F.relu, torch.relu, torch.relu_):
            return _Activation(None, ((0.0, 1.0),))
        if t is F.relu6:
            return _Activation(None, ((0.0, 1.0), (6.0, -1.0)))
        if t is F.hardtanh:
            return _Activation(None, ((float(_arg(node, 1, "min_val", -1.0)), 1.0),
                                      (float(_arg(node, 2, "max_val", 1.0)), -1.0)))
        if t is F.leaky_relu:
            return _Activation(None, ((0.0, 1.0 - float(_arg(node, 1, "negative_slope", 0.01))),))
        if t in (torch.clamp, torch.clip):
            lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
            if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
                return None
            return _Activation(None, tuple(k for k in ((lo, 1.0), (hi, -1.0)) if k[0] is not None))
        if t in _SMOOTH_FUNCTIONS:
            rest, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k != "inplace"}
            if any(isinstance(a, fx.Node) for a in [*rest, *kwargs.values()]):
                return None
            kinks: tuple[tuple[float, Any], ...] = ()
            if t is F.hardsigmoid:
                kinks = ((-3.0, 1 / 6), (3.0, -1 / 6))
            elif t is F.hardswish:
                kinks = ((-3.0, -0.5), (3.0, -0.5))
            elif t is F.selu:
                kinks = ((0.0, 1.0507009873554805 * (1.0 - 1.6732632423543772)),)
            elif t is F.elu:
                alpha = float(_arg(node, 1, "alpha", 1.0))
                kinks = ((0.0, 1.0 - alpha),) if alpha != 1.0 else ()
            return _Activation(lambda u, t=t, rest=rest, kw=kwargs: t(u, *rest, **kw), kinks)
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1:
            return _Activation(None, ((0.0, 1.0),))
        if node.target in _SMOOTH_METHODS and len(node.args) == 1:
            return _Activation(lambda u, name=node.target: getattr(u, name)(), ())
    return None


def second_derivative(act: Callable[[torch.Tensor], torch.Tensor] | None, u: torch.Tensor, *,
                      kinks: Sequence[tuple[float, float | torch.Tensor]] = (),
                      bandwidth: torch.Tensor | float | None = None) -> torch.Tensor:
    """σ''(u) elementwise: the smooth part of ``act`` by autograd (None: piecewise linear) plus, for
    each kink ``(location, jump of σ')``, the jump times a Gaussian kernel of ``bandwidth`` (the
    Dirac δ smoothed; a per-channel bandwidth broadcasts over the last axis of ``u``).

    >>> second_derivative(torch.tanh, torch.zeros(3))                       # tanh''(0) = 0
    tensor([0., 0., 0.])
    >>> second_derivative(None, torch.zeros(1), kinks=[(0.0, 1.0)], bandwidth=1.0)   # ReLU: φ(0)
    tensor([0.3989])
    """
    out = torch.zeros_like(u)
    if act is not None:
        with torch.enable_grad():
            x = u.detach().clone().requires_grad_()
            (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
            if d1.requires_grad:
                (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True)
                if d2 is not None:
                    out = out + d2.detach()
    if kinks:
        if bandwidth is None:
            raise MorphirError("an activation with kinks needs a bandwidth to smooth its Dirac σ''")
        h = torch.as_tensor(bandwidth, dtype=u.dtype, device=u.device)
        for loc, jump in kinks:
            z = (u - loc) / h
            out = out + torch.as_tensor(jump, dtype=u.dtype, device=u.device) * torch.exp(-0.5 * z * z) / (
                h * math.sqrt(2 * math.pi))
    return out
