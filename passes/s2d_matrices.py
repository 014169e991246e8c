"""Splitting matrices: for every neuron i of a layer, Sᵢ = E[Σ ∂L/∂aᵢ · σ''(uᵢ) · sᵢ² · x̃ x̃ᵀ], from
one pass per batch (a weighted Gram matrix of the unfolded patches). The method: :mod:`morphir.passes.s2d`.

>>> sms = splitting_matrices(g, batches, F.cross_entropy)
>>> sms["features.0.0"].eigenvalues[:3]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from morphir.api import (MorphGraph, MorphirError, ScoreContext, as_args, producer_starts)
from morphir.passes.s2d_activations import _Activation, _PASS, _activation, second_derivative

__all__ = ["SplittingMatrices", "splitting_matrices"]

log = logging.getLogger(__name__)


LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


_CHUNK = 1 << 22  # elements of one weighted-patch block (32 MiB in float64)


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
    n_batch = [int(as_args(x)[0].shape[0]) for x, _ in batches]
    total_samples = sum(n_batch)
    was_training = [m.training for m in gm.modules()]
    gm.eval()
    try:
        for (x, y), n in zip(batches, n_batch):
            rec = _Recorder(gm, keep, live)
            with torch.enable_grad():
                out = rec.run(*as_args(x))
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
