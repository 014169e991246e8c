"""``deepen``: insert a new layer that is exact at θ = 0.

Two variants at a node ``x`` with C channels:

* ``identity`` (after a ReLU or ReLU6): ``act(W x + b)`` with ``W = I + θ`` and ``b = 0``; exact
  because ``act(act(x)) = act(x)`` for these activations.
* ``residual`` (after any activation or residual add): ``x + W₂ relu(W₁ x)`` with ``W₁`` drawn
  at random (seeded by the site, so a rewrite is reproducible) and ``W₂ = θ``, zero by default.

Convolutional tensors get 3×3 (or 3, or 3×3×3) convolutions with padding 1; tensors whose
channels are last get linear layers.

>>> cands = [c for c in morphir.candidates(g, "deepen") if c.site.variant == "residual"]
>>> g2 = morphir.apply(g, cands[:1])
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from morphir.api import MorphGraph, Rewriter, ScoreContext, ScoredMorphism, Site, grad_dot

__all__ = ["Deepen"]

_IDEMPOTENT = {nn.ReLU: nn.ReLU, nn.ReLU6: nn.ReLU6, F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, "relu": nn.ReLU}
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid,
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.mish, torch.tanh, torch.sigmoid,
    "relu", "sigmoid", "tanh",
)
_ADDS = (operator.add, operator.iadd, torch.add, "add")
_CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def _op(graph: MorphGraph, node_name: str) -> object:
    node = graph.node(node_name)
    if node.op == "call_module":
        return type(graph.submodule(node.target))
    return node.target if node.op in ("call_function", "call_method") else None


class Deepen(ScoredMorphism):
    """Insert an identity-initialised layer or a zero-initialised residual branch after a node."""

    name = "deepen"
    description = "insert an identity layer after a ReLU, or a zero-initialised residual branch"

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for node in graph.module.graph.nodes:
            if self._geometry(graph, node.name) is None:
                continue
            op = _op(graph, node.name)
            if op in _IDEMPOTENT:
                yield Site(node.name, variant="identity")
            if op in _ACTIVATIONS or op in _ADDS:
                yield Site(node.name, variant="residual")

    def _geometry(self, graph: MorphGraph, node_name: str) -> tuple[int, int, int] | None:
        """``(channels, ndim, channel axis)`` if a layer can be inserted after the node."""
        layout = graph.layout(node_name)
        shape = graph.shape(node_name)
        if layout is None or shape is None or not torch.is_floating_point(torch.empty(0, dtype=graph.node(node_name).meta["tensor_meta"].dtype)):
            return None
        if layout.axis == layout.ndim - 1 or (layout.axis == 1 and layout.ndim in _CONVS):
            return int(shape[layout.axis]), layout.ndim, layout.axis
        return None

    def _layer(self, graph: MorphGraph, site: Site) -> nn.Module:
        geometry = self._geometry(graph, site.anchor)
        if geometry is None:
            raise ValueError(f"deepen cannot insert a layer after node {site.anchor!r}")
        c, ndim, axis = geometry
        if axis == ndim - 1:
            return nn.Linear(c, c)
        return _CONVS[ndim](c, c, 3, padding=1)

    def _first_layer(self, graph: MorphGraph, site: Site) -> nn.Module:
        """The residual branch's first layer, drawn from a generator seeded by the site."""
        layer = self._layer(graph, site)
        gen = torch.Generator().manual_seed(zlib.crc32(f"deepen@{site}".encode()) & 0x7FFFFFFF)
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=gen)
            layer.bias.zero_()
        return layer

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return self._layer(graph, site).weight.shape

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        layer = self._layer(graph, site)
        shape = graph.shape(site.anchor)
        c = layer.weight.shape[0]
        positions = max(int(torch.Size(shape[1:]).numel()) // c, 1)
        params = sum(p.numel() for p in layer.parameters())
        count = 2 if site.variant == "residual" else 1
        return count * params, count * 2 * layer.weight.numel() * positions

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        for site, theta in items:
            origin = f"deepen@{site}"
            if site.variant == "identity":
                layer = self._layer(rw.graph, site)
                with torch.no_grad():
                    eye = torch.zeros_like(layer.weight)
                    idx = torch.arange(eye.shape[0])
                    center = tuple(k // 2 for k in eye.shape[2:])
                    eye[(idx, idx, *center)] = 1
                    layer.weight.copy_(eye + theta.to(eye))
                    layer.bias.zero_()
                act = _IDEMPOTENT[_op(rw.graph, site.anchor)]()
                rw.insert_after(site.anchor, [("deep", layer), ("deep_act", act)], residual=False, origin=origin)
            elif site.variant == "residual":
                first, last = self._first_layer(rw.graph, site), self._layer(rw.graph, site)
                with torch.no_grad():
                    last.weight.copy_(theta.to(last.weight))
                    last.bias.zero_()
                modules = [("res1", first), ("res_act", nn.ReLU()), ("res2", last)]
                rw.insert_after(site.anchor, modules, residual=True, origin=origin)
            else:
                raise ValueError(f"unknown deepen variant {site.variant!r} at {site.anchor!r}")
        return bool(items)

    # -- scoring: Δz is the new layer's contribution at the anchor, read by all its users ------------
    def grad_nodes(self, graph: MorphGraph, sites: Sequence[Site]) -> list[str]:
        return [s.anchor for s in sites]

    def trust_radius(self, graph: MorphGraph, sites: Sequence[Site], trust: float) -> torch.Tensor:
        radii = []
        for site in sites:
            if site.variant == "residual":
                radii.append(trust * float(self._first_layer(graph, site).weight.detach().norm()))
            else:
                radii.append(trust * float(self._layer(graph, site).weight.shape[0]) ** 0.5)  # ‖I‖
        return torch.tensor(radii)

    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        rows = []
        for site, t in zip(sites, theta):
            a = ctx.value(site.anchor)
            layer = self._layer(ctx.graph, site)
            apply_weight = (lambda x, w: F.linear(x, w)) if isinstance(layer, nn.Linear) else (
                lambda x, w: layer._conv_forward(x, w, None))
            if site.variant == "residual":
                hidden = torch.relu(self._first_layer(ctx.graph, site)(a))
                dz = apply_weight(hidden, t)
            else:
                eye = torch.zeros_like(t)
                idx = torch.arange(eye.shape[0])
                eye[(idx, idx, *(k // 2 for k in eye.shape[2:]))] = 1
                act = _IDEMPOTENT[_op(ctx.graph, site.anchor)]()
                dz = act(apply_weight(a, eye + t)) - a
            rows.append(grad_dot(ctx, dz, site.anchor))
        return torch.stack(rows)
