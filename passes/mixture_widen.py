"""MixtureGrowth's widening: every mixed layer tiled g×g from the templates of the nets fused
(:func:`widen`), the diagonal blocks each net's own coefficients, the off-diagonal ones new.
The method: :mod:`morphir.passes.mixture`.

>>> grown = widen(mixed, factor=2, init="orthogonal", others=[net2])
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from morphir.api import MorphGraph, MorphirError
from morphir.passes.mixture_layers import (INITS, Init, TemplateMix, _alpha, _mixer, _plain, _rebuilt, _register, _set_module,
                                           mixed_layers)

__all__ = ["widen"]

log = logging.getLogger(__name__)


# -- widening ----------------------------------------------------------------------------------------
def _new_vectors(kind: str, count: int, kept: torch.Tensor, target: float, gen: torch.Generator) -> torch.Tensor:
    """``count`` new coefficient vectors of norm ``target`` (random, or orthogonal to ``kept``)."""
    dim = kept.shape[1]
    if count == 0:
        return torch.zeros(0, dim, dtype=torch.float64)
    if kind == "random":
        v = torch.randn(count, dim, generator=gen, dtype=torch.float64)
        return v / v.norm(dim=1, keepdim=True) * target
    u, s, _ = torch.linalg.svd(kept.double().T, full_matrices=False)
    kept_basis = u[:, s > 1e-8 * max(float(s.max()) if s.numel() else 0.0, 1e-30)]
    if kept_basis.shape[1] >= dim:
        raise MorphirError(f"mixture: orthogonal init needs room outside the {kept.shape[0]} existing coefficient "
                           f"vectors, but they span all {dim} template dimensions; use more templates or "
                           "init='random'")
    basis = kept_basis
    out = []
    for _ in range(count):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        for b in (basis, basis):  # twice: Gram-Schmidt's loss of orthogonality
            v = v - b @ (b.T @ v)
        if float(v.norm()) < 1e-6:  # no room left among the new ones: orthogonal to the old ones only
            v = torch.randn(dim, generator=gen, dtype=torch.float64)
            for b in (kept_basis, kept_basis):
                v = v - b @ (b.T @ v)
        v = v / v.norm()
        out.append(v * target)
        if basis.shape[1] < dim:
            basis = torch.cat([basis, v[:, None]], 1)
            if basis.shape[1] == dim:
                basis = kept_basis  # full: the rest need only be orthogonal to the old ones
    return torch.stack(out)


def _column_order(layout: Any, factor: int, old: torch.Tensor | None, old_width: int) -> torch.Tensor | None:
    """For a layer reading a tensor laid out as ``layout`` (every segment widened ``factor``×, copy
    after copy): which tiled column each input column is (None: in order)."""
    parts = []
    for seg in layout.segments:
        j = torch.arange(factor).view(factor, 1, 1)
        ch = torch.arange(seg.width).view(1, seg.width, 1)
        q = torch.arange(seg.inner).view(1, 1, seg.inner)
        small = seg.offset + ch * seg.inner + q
        tiled = old[small] if old is not None else small
        parts.append((j * old_width + tiled).reshape(-1))
    order = torch.cat(parts)
    return None if torch.equal(order, torch.arange(order.numel())) else order


def _widen_tensor(layout: Any, widened: set[str], factor: int, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """A per-channel tensor on ``layout`` widened: copy c of each widened segment from ``sources[c]``
    (the first source where there are fewer sources than copies)."""
    parts = []
    for seg in layout.segments:
        cut = slice(seg.offset, seg.offset + seg.width * seg.inner)
        copies = factor if seg.group in widened else 1
        parts += [(sources[c] if c < len(sources) else sources[0])[cut] for c in range(copies)]
    return torch.cat(parts)


def _node_of(graph: MorphGraph, name: str) -> fx.Node:
    return next(n for n in graph.module.graph.nodes if n.op == "call_module" and str(n.target) == name)


def _widened_groups(graph: MorphGraph, mixed: Mapping[str, nn.Module]) -> set[str]:
    """Growable groups that only mixed layers write and read (per-channel followers are widened too)."""
    out = set()
    for grp in graph.groups:
        if not grp.growable:
            continue
        unsupported = [p.module for p in grp.producers if p.module not in mixed]
        unsupported += [c.module for c in grp.consumers if c.module not in mixed]
        unsupported += [f.module for f in grp.followers
                        if isinstance(graph.submodule(f.module), nn.modules.conv._ConvNd) and f.module not in mixed]
        if unsupported:
            log.warning("mixture: channel group %s keeps its width: %s cannot be tiled", grp.name,
                        ", ".join(sorted(set(unsupported))))
            continue
        out.add(grp.name)
    return out


def _block_factors(graph: MorphGraph, name: str, widened: set[str], factor: int) -> tuple[int, int]:
    """How many times a mixed layer's rows and columns of blocks multiply (``factor`` or 1)."""
    analysis = graph.analysis
    if name in analysis.follower_layouts:  # a depthwise conv: rows only
        segments = analysis.follower_layouts[name].segments
        if len(segments) != 1:
            raise MorphirError(f"mixture: depthwise conv {name} reads concatenated channels; not supported")
        return (factor if segments[0].group in widened else 1), 1
    out_layout, in_layout = analysis.layouts.get(_node_of(graph, name).name), analysis.consumer_layouts.get(name)
    gr = factor if out_layout is not None and out_layout.segments[0].group in widened else 1
    reads = {s.group in widened for s in (in_layout.segments if in_layout is not None else ())}
    if len(reads) > 1:
        raise MorphirError(f"mixture: {name} reads channels of which only some can be widened; not supported")
    return gr, (factor if reads == {True} else 1)


def _tiled_grid(own: Sequence[torch.Tensor], gr: int, gc: int, init: str, scale: float,
                gen: torch.Generator | None) -> torch.Tensor:
    """The grown grid of coefficient blocks: super-block (n, n) (row or column n where the other
    factor is 1) holds ``own[n]`` on its own slot of templates; the others get new coefficients by
    ``init`` (``gen=None``: zeros, the structure only)."""
    rows, cols, k = own[0].shape
    nets = len(own) if (gr > 1 or gc > 1) else 1
    dim = k * len(own)
    grid = torch.zeros(rows * gr, cols * gc, dim, dtype=torch.float64)

    def cell(i: int, j: int) -> tuple[slice, slice]:
        return slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols)

    shrink = 1.0 / nets if (gr == 1 and gc > 1) else 1.0  # the output layer averages the nets
    kept = [(n if gr > 1 else 0, n if gc > 1 else 0) for n in range(nets)]
    for n, (i, j) in enumerate(kept):
        grid[(*cell(i, j), slice(n * k, (n + 1) * k))] = own[n].double() * shrink
    fresh = [(i, j) for i in range(gr) for j in range(gc) if (i, j) not in kept]
    if gen is None or not fresh:
        return grid
    if init == "copy":  # the kept super-block in the same row, else in the same column, else net 0's
        for i, j in fresh:
            src = next((c for c in kept if c[0] == i), None) or next((c for c in kept if c[1] == j), (0, 0))
            grid[cell(i, j)] = grid[cell(*src)]
        return grid
    old = torch.cat([grid[cell(i, j)].reshape(-1, dim) for i, j in kept])
    mean = float(old.norm(dim=1).mean())
    vectors = _new_vectors(init, len(fresh) * rows * cols, old, scale * (mean if mean > 0 else 1.0), gen)
    for idx, (i, j) in enumerate(fresh):
        grid[cell(i, j)] = vectors[idx * rows * cols:(idx + 1) * rows * cols].reshape(rows, cols, dim)
    return grid


def _widen_follower(target: nn.Module, sources: Sequence[nn.Module], layout: Any, widened: set[str],
                    factor: int) -> None:
    """Widen every per-channel parameter and buffer of a batch norm (or the like), copy c from
    ``sources[c]``."""
    size = layout.size
    new_size = sum(s.width * s.inner * (factor if s.group in widened else 1) for s in layout.segments)
    with torch.no_grad():
        for pname, p in list(target.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == size:
                vals = [getattr(m, pname).detach() for m in sources]
                setattr(target, pname, nn.Parameter(_widen_tensor(layout, widened, factor, vals).clone(),
                                                    requires_grad=p.requires_grad))
        for bname, b in list(target.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == size:
                vals = [getattr(m, bname).detach() for m in sources]
                target.register_buffer(bname, _widen_tensor(layout, widened, factor, vals).clone(),
                                       persistent=bname not in target._non_persistent_buffers_set)
    for attr in ("num_features", "num_parameters"):
        if isinstance(getattr(target, attr, None), int) and getattr(target, attr) == size:
            setattr(target, attr, new_size)


def _widen(graph: MorphGraph, factor: int, nets: int, others: Sequence[nn.Module] | None, init: str,
           scale: float, gen: torch.Generator | None) -> MorphGraph:
    """:func:`widen`; ``others=None`` builds the structure only (for replay: the weights follow)."""
    mixed = mixed_layers(graph.module)
    if not mixed:
        raise MorphirError("mixture: the graph has no template-mixed layers; prepare it with mix() first")
    sources = [graph.module, *(others or [])]
    if others is not None and len(sources) != nets:
        raise MorphirError(f"mixture: {nets} nets to fuse, got {len(sources)}")
    theirs = [mixed_layers(o) for o in others or []]
    for other in theirs:
        for name, layer in mixed.items():
            if name not in other or _alpha(other[name]).shape != _alpha(layer).shape \
                    or _mixer(other[name]).templates.shape != _mixer(layer).templates.shape:
                raise MorphirError(f"mixture: the nets to fuse differ at {name}; they must share one architecture")
    widened = _widened_groups(graph, mixed)
    gm = copy.deepcopy(graph.module)
    banks: dict[int, nn.Parameter] = {}
    for name, layer in mixed.items():
        mixer, alpha = _mixer(layer), _alpha(layer).detach()
        gr, gc = _block_factors(graph, name, widened, factor)
        own = [alpha, *(_alpha(t[name]).detach() for t in theirs)]
        own += [torch.zeros_like(alpha)] * (nets - len(own))  # replay: values follow from the checkpoint
        grid = _tiled_grid(own, gr, gc, init, scale, gen if others is not None else None)
        if id(mixer.templates) not in banks:  # the union of every net's bank, one new shared parameter
            parts = [mixer.templates.detach(), *(_mixer(t[name]).templates.detach() for t in theirs)]
            parts += [torch.zeros_like(parts[0])] * (nets - len(parts))
            banks[id(mixer.templates)] = nn.Parameter(torch.cat(parts).clone())
        _, o, i = mixer.templates.shape[:3]
        rows, cols = grid.shape[0] * o, grid.shape[1] * i
        groups = layer.groups * gr if name in graph.analysis.follower_layouts else 1
        new = _plain(layer, rows, rows if groups > 1 else cols, groups)
        new.train(layer.training)
        columns = None
        if gc > 1:
            columns = _column_order(graph.analysis.consumer_layouts[name], factor, mixer.columns, alpha.shape[1] * i)
        _register(new, TemplateMix(banks[id(mixer.templates)], columns, mixer.growths + 1), grid.to(alpha.dtype))
        if layer.bias is not None:
            biases = [layer.bias.detach(), *(t[name].bias.detach() for t in theirs)]
            used = len(biases) if (gr > 1 or gc > 1) else 1
            with torch.no_grad():  # rows of net n take its bias; the output layer averages them
                new.bias.copy_(torch.cat([biases[n] if n < used else biases[0] for n in range(gr)]) if gr > 1
                               else torch.stack(biases[:used]).mean(0))
        _set_module(gm, name, new)
    followers = dict.fromkeys(f.module for grp in graph.groups if grp.name in widened for f in grp.followers)
    for fname in followers:
        if fname not in mixed:
            _widen_follower(gm.get_submodule(fname), [s.get_submodule(fname) for s in sources],
                            graph.analysis.follower_layouts[fname], widened, factor)
    return _rebuilt(graph, gm, f"mixture:x{factor}" + (f",fuse{nets}" if nets > 1 else ""))


def widen(graph: MorphGraph, factor: int = 2, *, others: Sequence[nn.Module | MorphGraph] = (),
          init: Init = "orthogonal", scale: float = 1.0, generator: torch.Generator | None = None) -> MorphGraph:
    """A new graph with every widenable channel group of the mixed ``graph`` ``factor``× as wide
    (the network's inputs and outputs keep their size; batch norms and biases follow).

    Each layer's grid of coefficient blocks is tiled: the current grid stays as super-block (0, 0),
    and with ``others`` (trained nets of the same architecture, up to ``factor − 1``) net n's grid
    becomes super-block (n, n) on net n's templates, appended to the bank. Every other super-block
    gets new coefficients by ``init``: ``copy`` (those of the kept super-block in its row, else in
    its column), ``random`` or ``orthogonal`` (orthogonal to all kept vectors, and to each other while
    there is room), of norm ``scale`` × the kept vectors' mean norm. The output layer averages the
    nets (its kept blocks scaled 1/nets, its bias the nets' mean).

    >>> g2 = widen(g, 2, others=[g_b], init="orthogonal", generator=torch.Generator().manual_seed(0))
    """
    if not isinstance(factor, int) or factor < 2:
        raise MorphirError(f"mixture: factor must be an int >= 2, got {factor!r}")
    if init not in INITS:
        raise MorphirError(f"mixture: init must be one of {', '.join(INITS)}, got {init!r}")
    if len(others) > factor - 1:
        raise MorphirError(f"mixture: at most factor - 1 = {factor - 1} other nets can be fused, got {len(others)}")
    modules = [o.module if isinstance(o, MorphGraph) else o for o in others]
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return _widen(graph, factor, 1 + len(modules), modules, init, scale, gen)


def _shape_record(module: nn.Module) -> dict[str, list[int]]:
    return {name: list(_alpha(m).shape) for name, m in mixed_layers(module).items()}
