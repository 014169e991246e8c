"""``s2d``: splitting steepest descent (Liu, Wang, Wu, Liu, "Splitting Steepest Descent for Growing
Neural Architectures", NeurIPS 2019).

Splitting neuron i (incoming weights wᵢ, pre-activation uᵢ = sᵢ·wᵢ·x̃ + tᵢ, with sᵢ, tᵢ a batch norm
folded in eval mode, x̃ the incoming patch) into two halves at wᵢ ± ε vᵢ leaves the first-order term
of the loss at zero and changes it by ½ ε² vᵢᵀ Sᵢ vᵢ + O(ε³), with the *splitting matrix*

    Sᵢ = E[ Σ_positions ∂L/∂aᵢ · σ''(uᵢ) · sᵢ² · x̃ x̃ᵀ ]          (aᵢ = σ(uᵢ); E over the samples)

so the best direction is the eigenvector of the smallest eigenvalue λᵢ of Sᵢ, and neurons with the
most negative λᵢ gain most from splitting. This module computes every Sᵢ of a layer with one pass
per batch (a weighted Gram matrix of the unfolded patches), splits the neurons with λᵢ < 0, most
negative first, at most ``step.quota(group, positive)`` per group (the rate of the ``gn`` method),
along θᵢ = ε ‖wᵢ‖ vᵢ, with one ε for all of them: the best of a small grid by the real loss on the
step's batches and its held-out batches (never one that raises it; none at all: nothing split).

**σ'' of a kinked activation** (ReLU, ReLU6, hardtanh, leaky ReLU, PReLU, and the kinks of ELU,
SELU, hardsigmoid, hardswish) is a Dirac δ at each kink, weighted by the jump of σ' there. It is
replaced by a Gaussian kernel φ_h of bandwidth h: for ReLU that is exactly σ'' of
σ_h(u) = E_ξ[relu(u + ξ)], ξ ~ N(0, h²), i.e. a kernel density estimate of the mass of uᵢ at the
kink, weighted by ∂L/∂a and x̃x̃ᵀ. h follows Silverman's normal-reference rule per channel,
h = 1.06 · std(uᵢ) · n^(−1/5) (n: the sample-positions the matrix is averaged over), times
``bandwidth``. Smooth activations (tanh, sigmoid, softplus, GELU, SiLU, ...) use their exact σ''
(elementwise, by autograd).

**Which layers.** A group is split when it has one producer (a dense conv or a linear layer) whose
output, after an optional batch norm, feeds one elementwise activation, and no other activation of
the group follows. Others (a residual stream, a depthwise stage with a second activation) are
skipped and listed in ``Growth.info["s2d_skipped"]``. Max pooling after the activation is allowed
but its own kinks (ties within a window, where a split copy can switch the maximum) are not
modelled, as in the paper.

>>> morphir.grow(model, train, val, F.cross_entropy, method="s2d")        # once registered
>>> morphir.grow(model, train, val, F.cross_entropy, method=SplittingSteepestDescent(bandwidth=2.0))
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from morphir.api import (Candidate, Grower, Growth, GrowthStep, MorphGraph, MorphirError, ScoreContext, apply,
                         producer_starts)
from morphir.passes.split import Split

__all__ = [
    "SplittingSteepestDescent",
    "SplittingMatrices",
    "LineSearch",
    "splitting_matrices",
    "second_derivative",
    "split_line_search",
    "DEFAULT_GRID",
]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]

DEFAULT_GRID: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
"""Step sizes of the line search, relative to each split neuron's ‖wᵢ‖ (θᵢ = ε ‖wᵢ‖ vᵢ); the largest is
the trust radius the ``gn`` method learns θ within (``ScoreConfig.trust``)."""

_CHUNK = 1 << 22  # elements of one weighted-patch block (32 MiB in float64)


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


# -- which groups, and what a batch contributes ---------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    """One splittable group: its producer, the node whose output is u, the batch-norm scale s folded
    into u, and the activation reading u."""

    group: str
    producer: str  # module
    producer_node: str
    input_node: str
    pre: str  # node whose output is u
    post: str  # the activation node
    scale: torch.Tensor | None
    act: _Activation
    axis: int


def _layers(graph: MorphGraph, groups: Iterable[str], max_dim: int) -> tuple[list[_Layer], dict[str, str]]:
    """The groups s2d can split, and for the others the reason why not."""
    ctx = ScoreContext(graph, {}, {}, {}, torch.zeros(1))
    nodes = {n.name: n for n in graph.module.graph.nodes}
    out: list[_Layer] = []
    skipped: dict[str, str] = {}
    for name in groups:
        grp = graph.group(name)
        if len(grp.producers) != 1:
            skipped[name] = (f"{len(grp.producers)} producers (a residual stream): not modelled" if grp.producers
                             else "no producer")
            continue
        prod = grp.producers[0]
        module = graph.submodule(prod.module)
        if isinstance(module, nn.Conv2d | nn.Conv1d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
                skipped[name] = f"{prod.module} is a grouped, non-zero-padded or 'same'-padded conv"
                continue
        elif not isinstance(module, nn.Linear):
            skipped[name] = f"{prod.module} is a {type(module).__name__}: not a dense conv or linear layer"
            continue
        if graph.incoming_numel(name) > max_dim:
            skipped[name] = f"{graph.incoming_numel(name)} incoming weights per neuron (> max_dim {max_dim})"
            continue
        start = producer_starts(ctx, name)[0]
        pre = nodes[start.node]
        while len(pre.users) == 1:  # through identities (dropout in eval mode)
            user = next(iter(pre.users))
            if user.op == "call_module" and isinstance(graph.submodule(str(user.target)), _PASS) and user.args[0] is pre:
                pre = user
            else:
                break
        users = list(pre.users)
        act = _activation(graph, users[0], pre) if len(users) == 1 else None
        if act is None:
            skipped[name] = f"the output of {pre.name} does not feed one elementwise activation"
            continue
        member = set(grp.nodes)
        later = [n for n in grp.nodes if n not in (pre.name, users[0].name) and n in member
                 and _activation(graph, nodes[n], nodes[n].args[0] if nodes[n].args else None) is not None]
        if later:
            skipped[name] = f"a second activation ({later[0]}) follows: its curvature is not modelled"
            continue
        layout = graph.layout(pre.name)
        axis = layout.axis if layout is not None else 1
        out.append(_Layer(name, prod.module, prod.node, nodes[prod.node].args[0].name, pre.name, users[0].name,
                          start.scale, act, axis))
    return out, skipped


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps (a clone of) the outputs of ``keep``; ``live`` outputs stay in the
    autograd graph so the loss can be differentiated at them."""

    def __init__(self, module: fx.GraphModule, keep: set[str], live: set[str]):
        super().__init__(module)
        self.keep, self.live = keep, live
        self.kept: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.live:
            self.outputs[n.name] = out
        if n.name in self.keep:
            self.kept[n.name] = out.detach().clone()  # before an in-place activation overwrites it
        return out


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each output position's incoming patch, one row per (sample, position), in weight order."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    pad = 0 if isinstance(module.padding, str) else module.padding
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, pad[0] if pad else 0), stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad or 0, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(sample·position, channel) view of a tensor with channels on ``axis``."""
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


def _weighted_gram(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_m c[m, k] x[m] x[m]ᵀ for every channel k: shape (channels, d, d)."""
    m, d = x.shape
    out = x.new_zeros(c.shape[1], d, d)
    step = max(1, _CHUNK // max(1, m * d))
    xt = x.T
    for k in range(0, c.shape[1], step):
        out[k : k + step] = (xt.unsqueeze(0) * c[:, k : k + step].T.unsqueeze(1)) @ x
    return out


# -- the splitting matrices ----------------------------------------------------------------------------
@dataclass
class SplittingMatrices:
    """The splitting matrices of one group and their smallest eigenpairs.

    ``matrices``: (width, d, d) float64, Sᵢ over the incoming weights of neuron i (the order of
    :meth:`MorphGraph.incoming_weights`); ``eigenvalues``: λ_min per neuron; ``directions``: the unit
    eigenvectors of λ_min, (width, d); ``bandwidth``: the per-neuron h that smoothed a kinked
    activation (None for a smooth one); ``weight_norms``: ‖wᵢ‖.

    >>> sm = splitting_matrices(g, batches, F.cross_entropy)["features.3.0"]
    >>> sm.eigenvalues.argsort()[:3]          # the three neurons that gain most from splitting
    """

    group: str
    matrices: torch.Tensor
    eigenvalues: torch.Tensor
    directions: torch.Tensor
    bandwidth: torch.Tensor | None
    weight_norms: torch.Tensor

    def predicted_delta(self, channel: int, theta: torch.Tensor) -> float:
        """The second-order loss change ½ θᵀ Sᵢ θ of splitting ``channel`` at w ± θ.

        >>> sm.predicted_delta(3, 0.1 * sm.directions[3])
        """
        t = theta.reshape(-1).to(self.matrices)
        return 0.5 * float(t @ self.matrices[channel] @ t)


def _loss_inputs(x: Any) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def splitting_matrices(graph: MorphGraph, batches: Iterable[tuple[Any, Any]], loss_fn: LossFn, *,
                       groups: Iterable[str] | None = None, bandwidth: float = 1.0, max_dim: int = 1024,
                       skipped: dict[str, str] | None = None) -> dict[str, SplittingMatrices]:
    """Sᵢ of every neuron of ``groups`` (default: every group a split may act on), averaged over
    ``batches`` with the network in eval mode (batch norms as their running statistics fold them);
    its weights and ``.grad`` are not touched. ``bandwidth`` scales Silverman's h for kinked
    activations. Groups s2d cannot model, or whose neurons have more than ``max_dim`` incoming
    weights, are left out; their reasons go into ``skipped``.

    Cost per group of width C with d incoming weights per neuron: C·d²·(samples × positions)
    multiply-adds for the matrices, C eigendecompositions of d × d (≈ 0.1 s each at d = 576 on one
    core); memory C·d² float64.

    >>> sms = splitting_matrices(g, [(x, y)], F.cross_entropy)
    >>> {k: float(v.eigenvalues.min()) for k, v in sms.items()}
    """
    batches = list(batches)
    if not batches:
        raise MorphirError("splitting_matrices got no batches; pass a non-empty list of (x, y)")
    if groups is None:
        groups = [grp.name for grp in graph.groups if grp.growable and grp.nonlinear]
    layers, skip = _layers(graph, list(groups), max_dim)
    if skipped is not None:
        skipped.update(skip)
    for name, why in skip.items():
        log.info("s2d: group %s skipped: %s", name, why)
    if not layers:
        return {}
    gm = graph.module
    keep = {n for ly in layers for n in (ly.input_node, ly.pre)}
    live = {ly.post for ly in layers}
    sums: dict[str, torch.Tensor] = {}
    h_used: dict[str, torch.Tensor] = {}
    total = 0
    n_batch = [int(_loss_inputs(x)[0].shape[0]) for x, _ in batches]
    total_samples = sum(n_batch)
    was_training = [m.training for m in gm.modules()]
    gm.eval()
    try:
        for (x, y), n in zip(batches, n_batch):
            rec = _Recorder(gm, keep, live)
            with torch.enable_grad():
                out = rec.run(*_loss_inputs(x))
                loss = loss_fn(out, y)
                grads = torch.autograd.grad(loss, [rec.outputs[ly.post] for ly in layers], allow_unused=True)
            for ly, g in zip(layers, grads):
                u = _rows(rec.kept[ly.pre], ly.axis).double()
                g = torch.zeros_like(u) if g is None else _rows(g.detach(), ly.axis).double()
                if ly.act.kinks:
                    points = u.shape[0] * len(batches)
                    h = bandwidth * 1.06 * u.std(dim=0, unbiased=True).nan_to_num(0.0) * points ** -0.2
                    # a channel with (almost) constant u would get a spike: floor h at 1 % of the layer's mean
                    h = h.clamp_min(max(0.01 * float(h.mean()), 1e-6 * (1.0 + float(u.abs().max()))))
                    h_used[ly.group] = h_used.get(ly.group, 0) + h * (n / total_samples)
                else:
                    h = None
                curv = second_derivative(ly.act.fn, u, kinks=ly.act.kinks, bandwidth=h)
                c = g * curv
                if ly.scale is not None:
                    c = c * ly.scale.double().pow(2)
                patches = _patches(graph.submodule(ly.producer), rec.kept[ly.input_node])
                work = torch.promote_types(patches.dtype, torch.float32)  # the model's precision, at least float32
                s = _weighted_gram(patches.to(work), c.to(work)).double() * (n / total_samples)
                sums[ly.group] = sums[ly.group] + s if ly.group in sums else s
            total += n
    finally:
        for m, t in zip(gm.modules(), was_training):
            m.training = t
    out_: dict[str, SplittingMatrices] = {}
    for ly in layers:
        s = sums[ly.group]
        s = 0.5 * (s + s.transpose(1, 2))
        vals, vecs = torch.linalg.eigh(s)
        width = s.shape[0]
        norms = torch.stack([graph.incoming_weights(ly.group, i).double().norm() for i in range(width)])
        out_[ly.group] = SplittingMatrices(ly.group, s, vals[:, 0], vecs[:, :, 0].contiguous(),
                                           h_used.get(ly.group), norms)
    log.debug("s2d: splitting matrices of %d groups over %d samples", len(out_), total)
    return out_


# -- the line search ------------------------------------------------------------------------------------
@torch.no_grad()
def _loss(graph: MorphGraph, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn) -> float:
    gm = graph.module
    was = [m.training for m in gm.modules()]
    gm.eval()
    try:
        total, count = 0.0, 0
        for x, y in batches:
            n = int(_loss_inputs(x)[0].shape[0])
            total += float(loss_fn(gm(*_loss_inputs(x)), y)) * n
            count += n
        return total / max(count, 1)
    finally:
        for m, t in zip(gm.modules(), was):
            m.training = t


def _weight_dtype(graph: MorphGraph, group: str) -> torch.dtype:
    return graph.submodule(graph.group(group).producers[0].module).weight.dtype


@dataclass
class LineSearch:
    """The line search's result: ``eps`` (0 when no step size lowered the loss), ``base`` (the loss
    before splitting) and ``losses`` (the loss after splitting at each step size tried).

    >>> ls = split_line_search(g, cands, directions, batches, F.cross_entropy); ls.eps, ls.gain
    """

    eps: float
    base: float
    losses: dict[float, float]

    @property
    def gain(self) -> float:
        """base − loss at ``eps`` (≥ 0; 0 when ``eps`` is 0)."""
        return self.base - self.losses[self.eps] if self.eps else 0.0


def split_line_search(graph: MorphGraph, cands: Sequence[Candidate], directions: Mapping[Candidate, torch.Tensor],
                batches: Sequence[tuple[Any, Any]], loss_fn: LossFn, *,
                grid: Sequence[float] = DEFAULT_GRID) -> LineSearch:
    """The ε of ``grid`` that minimises the real loss on ``batches`` when every candidate is split at
    θ = ε · ``directions[c]`` (one shared ε), or 0 when none is lower than the loss before
    splitting: the result never raises the loss on ``batches``.

    The split network's weights are affine in ε (its producer rows are w ± ε·direction), so two
    rewrites serve the whole grid; the winner is then re-measured on a real rewrite at that ε (the
    θ the growth loop will apply), and kept only if that loss is below the loss before splitting.

    >>> ls = split_line_search(g, cands, {c: w_norm * v for c, ...}, batches, F.cross_entropy)
    >>> thetas = {c: ls.eps * directions[c] for c in cands}
    """
    cands = list(cands)

    def thetas(eps: float) -> dict[Candidate, torch.Tensor]:
        return {c: (eps * directions[c]).to(_weight_dtype(graph, c.site.anchor)) for c in cands}

    base = _loss(graph, batches, loss_fn)
    losses: dict[float, float] = {0.0: base}
    grid = sorted({float(e) for e in grid if e > 0})
    if not cands or not grid:
        return LineSearch(0.0, base, losses)
    zero = apply(graph, cands, None, verify=False)
    unit = apply(graph, cands, thetas(1.0), verify=False)
    params = dict(zero.module.named_parameters())
    origin = {k: p.detach().clone() for k, p in params.items()}
    slope = {k: p.detach() - origin[k] for k, p in unit.module.named_parameters() if not torch.equal(p, origin[k])}
    with torch.no_grad():
        for eps in grid:
            for k, d in slope.items():
                params[k].copy_(origin[k] + eps * d)
            losses[eps] = _loss(zero, batches, loss_fn)
    finite = {e: v for e, v in losses.items() if math.isfinite(v)}
    best = min(finite, key=lambda e: (finite[e], e)) if finite else 0.0
    if best and finite[best] < base:
        losses[best] = _loss(apply(graph, cands, thetas(best), verify=False), batches, loss_fn)  # the real θ
    if not best or not losses[best] < base:
        best = 0.0
    return LineSearch(best, base, losses)


# -- the grower -----------------------------------------------------------------------------------------
class SplittingSteepestDescent(Grower):
    """Split the neurons whose splitting matrix has the most negative λ_min along its eigenvector,
    with one step size found by a line search on the real loss.

    At a growth step: Sᵢ of every neuron of every layer it models, on the step's batches; per
    group, the neurons with λᵢ < 0, most negative first, at most ``step.quota(group, positive)``;
    θᵢ = ε ‖wᵢ‖ vᵢ with ε the best of ``grid`` by the real loss on ``step.all_batches()`` (the
    batches S was estimated on and the held-out ones: what the loop measures its loss jump on). With a
    positive ``lam`` a split is kept only if its second-order gain −½ ε² ‖wᵢ‖² λᵢ exceeds λ·ΔR (ΔR
    per ``resource``), and the line search runs again on those kept.

    ``preserving = True`` means: each split is the ``split`` morphism, exact at θ = 0 (the engine
    checks it), and at the chosen ε the network's function moves by O(ε²) per split, only in the
    direction the line search accepted: the mean loss on ``step.all_batches()`` does not rise (it
    falls by ``Growth.info["s2d_line_search_gain"]``, which the loop's ``loss_jump`` reproduces).
    Outputs on other inputs are not preserved, and the loss there may rise. When no ε lowers the
    loss nothing is split (a split at ε = 0 would keep two identical copies forever).

    ``grid``: the step sizes tried (relative to ‖wᵢ‖); ``bandwidth``: scales the kernel that
    smooths a kinked σ''; ``max_dim``: layers with more incoming weights per neuron are skipped
    (the dense Sᵢ costs d² memory and d³ time per neuron).

    >>> growth = SplittingSteepestDescent().grow(step)
    >>> growth.info["s2d_eps"], [str(c.site) for c in growth.chosen][:3]
    """

    name = "s2d"
    description = "splitting steepest descent: split along the min eigenvector of the splitting matrix (Liu et al. 2019)"
    preserving = True

    def __init__(self, grid: Sequence[float] = DEFAULT_GRID, bandwidth: float = 1.0, max_dim: int = 1024):
        if not grid or any(not e > 0 for e in grid):
            raise MorphirError(f"the line-search grid must be positive step sizes, got {tuple(grid)}")
        if not bandwidth > 0:
            raise MorphirError(f"bandwidth must be positive, got {bandwidth}")
        self.grid = tuple(float(e) for e in grid)
        self.bandwidth = float(bandwidth)
        self.max_dim = int(max_dim)

    def directions(self, step: GrowthStep) -> tuple[list[Candidate], dict[Candidate, torch.Tensor],
                                                    dict[Candidate, float], dict[str, str]]:
        """The candidates to split (ranked and capped per group), each one's unit-step direction
        ‖wᵢ‖ vᵢ and λᵢ ‖wᵢ‖² (the curvature along it), and the groups skipped with the reason.

        >>> chosen, dirs, curv, skipped = SplittingSteepestDescent().directions(step)
        """
        graph = step.graph
        cands = step.candidates(Split(fresh_norm=None))  # the paper's plain copies
        by_group: dict[str, list[Candidate]] = {}
        for c in cands:
            by_group.setdefault(c.site.anchor, []).append(c)
        skipped: dict[str, str] = {}
        sms = splitting_matrices(graph, step.batches, step.loss_fn, groups=list(by_group), bandwidth=self.bandwidth,
                                 max_dim=self.max_dim, skipped=skipped)
        chosen: list[Candidate] = []
        dirs: dict[Candidate, torch.Tensor] = {}
        curv: dict[Candidate, float] = {}
        for group, group_cands in by_group.items():
            sm = sms.get(group)
            if sm is None:
                continue
            negative = [c for c in group_cands if float(sm.eigenvalues[c.site.index]) < 0]
            negative.sort(key=lambda c: (float(sm.eigenvalues[c.site.index]), c.site.index))
            for c in negative[: step.quota(group, len(negative))]:
                i = c.site.index
                w_norm = float(sm.weight_norms[i])
                dtype = graph.incoming_weights(group, i).dtype
                dirs[c] = (w_norm * sm.directions[i]).to(dtype)
                curv[c] = float(sm.eigenvalues[i]) * w_norm**2
                chosen.append(c)
        return chosen, dirs, curv, skipped

    def grow(self, step: GrowthStep) -> Growth:
        cfg = step.config
        chosen, dirs, curv, skipped = self.directions(step)
        info: dict[str, Any] = {"s2d_skipped": skipped, "s2d_eps": 0.0, "s2d_line_search_gain": 0.0,
                                "s2d_candidates": len(chosen)}
        if not chosen:
            log.info("s2d: no neuron has a negative splitting eigenvalue")
            return Growth(info=info)
        search = split_line_search(step.graph, chosen, dirs, step.all_batches(), step.loss_fn, grid=self.grid)
        if search.eps and cfg.lam > 0:
            def cost(c: Candidate) -> int:
                return c.delta_params if cfg.resource == "params" else c.delta_flops

            kept = [c for c in chosen if -0.5 * search.eps**2 * curv[c] > cfg.lam * cost(c)]
            if len(kept) < len(chosen):
                chosen = kept
                search = (split_line_search(step.graph, chosen, dirs, step.all_batches(), step.loss_fn, grid=self.grid)
                          if chosen else LineSearch(0.0, search.base, {0.0: search.base}))
        info.update({"s2d_eps": search.eps, "s2d_line_search_gain": search.gain,
                     "s2d_line_search": {str(e): v for e, v in sorted(search.losses.items())}})
        if not search.eps:
            log.info("s2d: no step size of %s lowered the loss; nothing split", self.grid)
            return Growth(info=info)
        thetas = {c: search.eps * dirs[c] for c in chosen}
        gain = -0.5 * search.eps**2 * sum(curv[c] for c in chosen)
        log.info("s2d: splitting %d neurons at ε = %g (loss %.5f -> %.5f)", len(chosen), search.eps, search.base,
                 search.losses[search.eps])
        return Growth(chosen=chosen, thetas=thetas, estimated_gain=gain, info=info)
