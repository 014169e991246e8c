"""``mixture``: MixtureGrowth (Pham, Teterwak, Nelson, Plummer, WACV 2024, arXiv 2311.04251).

Every convolution and linear layer generates its weight from *templates*: ``W = Σₖ αₖ Tₖ``, with
one bank of templates shared by adjacent layers of the same shape and a coefficient vector α per
layer (:func:`mix`, what :meth:`MixtureGrowth.prepare` does to the seed). Growth by a factor g
*tiles* each layer: the grown weight is a g×g block matrix (g×1 for the first layer, which keeps
its inputs, and for depthwise convs; 1×g for the classifier, which keeps its outputs) whose blocks
are the templates mixed by their own coefficient vectors (:func:`widen`). With *fusion*, g − 1
more small nets are trained from scratch at the growth step and the grown net's templates are the
union of all nets' templates: block (n, n) is net n's layer (its own coefficients on its own
templates, its batch-norm channels and biases) and only the off-diagonal blocks get new
coefficients, initialised ``random``, ``copy`` (the coefficients of the net whose diagonal block
shares the row) or ``orthogonal`` (orthogonal to every coefficient vector the layer already has,
and to each other while there is room). The classifier averages the nets' outputs, so with the
off-diagonal blocks at zero the fused net computes exactly the mean of the nets' logits.

The weight is computed by a :mod:`torch.nn.utils.parametrize` parametrization (:class:`TemplateMix`),
so a mixed layer stays an ``nn.Conv2d`` / ``nn.Linear`` for torch.fx, the channel analysis and the
ONNX exporter. Such a module cannot be pickled whole (``torch.save(module)``); :func:`bake` turns
the mixed layers back into plain ones.

>>> from morphir.passes.mixture import MixtureGrowth
>>> res = morphir.grow(zoo.build("vgg19", (1, 8, 8), 10), data.train, data.val, F.cross_entropy,
...                    method=MixtureGrowth(factor=2, init="orthogonal"), phases=2, phase_epochs=5)
>>> res.metrics[0]["loss_jump"], res.metrics[-1]["widths"]["features.0.0"]   # a finite jump, 32 channels
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from morphir.api import (CheckpointError, GrowConfig, Grower, Growth, GrowthStep, MorphGraph, MorphirError, PassResult,
                         Registry, TrainingError, recalibrate_batch_norm, train_epoch)

__all__ = ["MixtureGrowth", "TemplateMix", "mix", "widen", "mixed_layers", "bake"]

log = logging.getLogger(__name__)

Init = Literal["random", "copy", "orthogonal"]
INITS: tuple[str, ...] = ("random", "copy", "orthogonal")
_MIXABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CPU = torch.device("cpu")


# -- the template-mixing parametrization -------------------------------------------------------------
def _assemble(coefficients: torch.Tensor, templates: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """The weight of a block grid: block (i, j) = Σₖ coefficients[i, j, k] · templates[k]."""
    blocks = torch.tensordot(coefficients, templates, dims=([2], [0]))  # (rows, cols, O, I, *kernel)
    rows, cols, o, i = blocks.shape[:4]
    weight = blocks.movedim(2, 1).reshape(rows * o, cols * i, *blocks.shape[4:])
    return weight if columns is None else weight.index_select(1, columns)


class TemplateMix(nn.Module):
    """The parametrization of a mixed layer's ``weight``: a grid of blocks, block (i, j) being
    ``Σₖ α[i, j, k] · templates[k]`` (α: the layer's ``parametrizations.weight.original``, of shape
    (rows, cols, K); ``templates``: (K, out, in, *kernel), shared by the layers of one bank).

    ``columns`` (None: in order) reorders the input columns where a concatenation interleaves the
    copies of several channel groups; ``growths`` counts the growth steps the layer went through.

    >>> layer = mixed_layers(graph.module)["features.1.0"]
    >>> mixer = layer.parametrizations.weight[0]; alpha = layer.parametrizations.weight.original
    >>> torch.equal(layer.weight, torch.tensordot(alpha, mixer.templates, dims=([2], [0]))[0, 0])
    True
    """

    def __init__(self, templates: nn.Parameter, columns: torch.Tensor | None = None, growths: int = 0) -> None:
        super().__init__()
        self.templates = templates
        self.register_buffer("columns", columns, persistent=False)
        self.growths = growths

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return _assemble(coefficients, self.templates, self.columns)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The coefficients that mix the templates closest to ``weight`` (least squares per block)."""
        t = self.templates.detach()
        o, i = t.shape[1], t.shape[2]
        rows, cols = weight.shape[0] // o, weight.shape[1] // i
        tiled = weight
        if self.columns is not None:
            tiled = torch.empty_like(weight)
            tiled[:, self.columns] = weight
        blocks = tiled.reshape(rows, o, cols, i, *weight.shape[2:]).movedim(1, 2).reshape(rows * cols, -1)
        solution = torch.linalg.lstsq(t.reshape(t.shape[0], -1).T, blocks.T).solution  # (K, rows·cols)
        return solution.T.reshape(rows, cols, t.shape[0]).contiguous()


def _mixer(layer: nn.Module) -> TemplateMix | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    found = [p for p in layer.parametrizations.weight if isinstance(p, TemplateMix)]
    return found[0] if found else None


def _alpha(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


def mixed_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The template-mixed layers of ``module`` by qualified name, in module order.

    >>> list(mixed_layers(graph.module))[:2]
    ['features.0.0', 'features.1.0']
    """
    return {name: m for name, m in module.named_modules() if _mixer(m) is not None}


def bake(module: nn.Module) -> nn.Module:
    """Turn every mixed layer of ``module`` back into a plain layer holding its current weight, in
    place (e.g. before ``torch.save(module)``, which cannot pickle parametrized modules).

    Each mixed layer is replaced by a new plain one (``parametrize.remove_parametrizations`` is not
    used: a deep copy of a parametrized layer shares its class with the original, and removing the
    parametrization from one would strip ``weight`` from the other).

    >>> torch.save(bake(copy.deepcopy(result.graph.module)), "grown.pt")
    """
    for name, layer in mixed_layers(module).items():
        w = layer.weight.detach()
        depthwise = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1
        plain = _plain(layer, w.shape[0], w.shape[0] if depthwise else w.shape[1], getattr(layer, "groups", 1))
        with torch.no_grad():
            plain.weight.copy_(w)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        plain.train(layer.training)
        _set_module(module, name, plain)
    return module


# -- initialisation ----------------------------------------------------------------------------------
def _orthonormal_rows(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` unit vectors in R^k, mutually orthogonal when ``n <= k``."""
    a = torch.randn(max(n, k), min(n, k), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)
    rows = q.T if n <= k else q
    return (rows / rows.norm(dim=1, keepdim=True)).float()


def _fan_in(template_shape: Sequence[int]) -> int:
    return int(math.prod(template_shape[1:]))


def _draw_templates(k: int, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """``k`` templates drawn like torch's default conv/linear init: U(−b, b), b = 1/√fan_in."""
    bound = 1.0 / math.sqrt(max(_fan_in(shape), 1))
    return (torch.rand(k, *shape, generator=gen) * 2 - 1) * bound


def _mixable(gm: fx.GraphModule) -> list[str]:
    """Conv and linear layers that can mix templates, in graph order (each called once)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    names = []
    for name, count in calls.items():
        m = gm.get_submodule(name)
        if type(m) not in _MIXABLE or parametrize.is_parametrized(m):
            continue
        depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1 and not depthwise:
            log.info("mixture: %s is a grouped conv (groups=%d); it keeps its own weight", name, m.groups)
            continue
        if count > 1:
            log.info("mixture: %s is called %d times; it keeps its own weight", name, count)
            continue
        names.append(name)
    return names


def _banks(gm: fx.GraphModule, names: Sequence[str], share: int | None) -> list[list[str]]:
    """Runs of adjacent layers (in graph order) of one type and weight shape, at most ``share`` long."""
    banks: list[list[str]] = []
    last_key: tuple[Any, ...] | None = None
    for name in names:
        m = gm.get_submodule(name)
        key = (type(m), tuple(m.weight.shape), getattr(m, "groups", 1))
        if key == last_key and (share is None or len(banks[-1]) < share):
            banks[-1].append(name)
        else:
            banks.append([name])
        last_key = key
    return banks


def _register(layer: nn.Module, mixer: TemplateMix, alpha: torch.Tensor) -> None:
    parametrize.register_parametrization(layer, "weight", mixer)
    with torch.no_grad():
        _alpha(layer).copy_(alpha)


def _reset_mixed(module: nn.Module, gen: torch.Generator) -> None:
    """Redraw every bank's templates and its layers' coefficients and biases from ``gen``."""
    by_bank: dict[int, list[nn.Module]] = {}
    for layer in mixed_layers(module).values():
        by_bank.setdefault(id(_mixer(layer).templates), []).append(layer)
    with torch.no_grad():
        for layers in by_bank.values():
            t = _mixer(layers[0]).templates
            t.copy_(_draw_templates(t.shape[0], t.shape[1:], gen))
            cells = [_alpha(m).shape[0] * _alpha(m).shape[1] for m in layers]
            vectors = _orthonormal_rows(sum(cells), t.shape[0], gen)
            start = 0
            for m, n in zip(layers, cells):
                _alpha(m).copy_(vectors[start:start + n].reshape(_alpha(m).shape))
                start += n
                if getattr(m, "bias", None) is not None:
                    bound = 1.0 / math.sqrt(max(_fan_in(t.shape[1:]), 1))
                    m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)


def _reinitialise(module: nn.Module, gen: torch.Generator) -> None:
    """A fresh start for ``module`` (MixtureGrowth's second network): mixed layers from ``gen``,
    every other layer by its own ``reset_parameters`` under a seed from ``gen``."""
    mixed = set(mixed_layers(module).values())
    _reset_mixed(module, gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if m in mixed:
                continue
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
            if callable(getattr(m, "reset_running_stats", None)):
                m.reset_running_stats()


def _rebuilt(graph: MorphGraph, gm: fx.GraphModule, what: str) -> MorphGraph:
    try:
        return MorphGraph(gm, graph.example_inputs, probe_inputs=graph.probe_inputs, rules=graph.rules,
                          history=(*graph.history, what))
    except MorphirError as exc:
        raise MorphirError(f"mixture: the network after {what} does not run on its example inputs: {exc}") from None


def mix(graph: MorphGraph, *, templates: int = 4, share: int | None = None, seed: int = 0) -> MorphGraph:
    """``graph`` with every conv and linear layer in template-mixing form (a new graph; module names
    kept, biases kept, weights redrawn): adjacent layers of one shape share a bank of ``templates``
    templates (at most ``share`` layers per bank; None: no limit), each layer has its own unit-norm
    coefficient vector (mutually orthogonal within a bank while there is room).

    Raises :class:`MorphirError` when the model has no layer it can mix.

    >>> g = mix(morphir.trace(zoo.build("vgg19", (1, 8, 8), 10), torch.randn(1, 1, 8, 8)), templates=4)
    """
    if templates < 1:
        raise MorphirError(f"mixture: templates must be at least 1, got {templates}")
    gm = copy.deepcopy(graph.module)
    names = _mixable(gm)
    if not names and mixed_layers(gm):
        raise MorphirError("mixture: the model is already in template-mixing form")
    if not names:
        raise MorphirError(f"mixture: {type(graph.module).__name__} has no convolution (groups 1 or depthwise) or "
                           "linear layer it can mix; MixtureGrowth needs at least one")
    gen = torch.Generator().manual_seed(seed)
    for bank in _banks(gm, names, share):
        shape = tuple(gm.get_submodule(bank[0]).weight.shape)
        first = gm.get_submodule(bank[0]).weight
        shared = nn.Parameter(_draw_templates(templates, shape, gen).to(first.dtype))
        alphas = _orthonormal_rows(len(bank), templates, gen).to(first.dtype)
        for name, alpha in zip(bank, alphas):
            _register(gm.get_submodule(name), TemplateMix(shared), alpha.reshape(1, 1, templates))
        log.debug("mixture: bank of %d templates %s shared by %s", templates, shape, ", ".join(bank))
    return _rebuilt(graph, gm, "mixture:mix")


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


def _plain(layer: nn.Module, out_f: int, in_f: int, groups: int) -> nn.Module:
    base = parametrize.type_before_parametrizations(layer)
    w = layer.weight
    if issubclass(base, nn.Linear):
        return base(in_f, out_f, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    return base(in_f, out_f, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                groups=groups, bias=layer.bias is not None, padding_mode=layer.padding_mode, device=w.device,
                dtype=w.dtype)


def _set_module(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)


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


# -- the grower ---------------------------------------------------------------------------------------
class MixtureGrowth(Grower):
    """MixtureGrowth: template-mixing layers, grown ``factor``× by tiling (and fusing ``factor − 1``
    freshly trained nets when ``fuse``); new coefficient blocks by ``init``.

    Not function-preserving: the new off-diagonal blocks (and with fusion the other nets' halves)
    change the output at growth; the loop measures the jump (``record["loss_jump"]``). Only the first
    ``steps`` growth steps grow (later ones add nothing), so the width does not multiply every phase.
    ``templates``: per bank; ``share``: at most this many adjacent same-shape layers per bank
    (None: all); ``scale``: norm of new coefficient vectors relative to the existing ones.

    >>> morphir.grow(model, train, val, F.cross_entropy, method=MixtureGrowth(factor=2, init="copy"))
    """

    name = "mixture"
    description = "MixtureGrowth: template-mixing layers, widened by tiling and fusing a second trained net"
    preserving = False

    def __init__(self, factor: int = 2, init: Init = "orthogonal", fuse: bool = True, templates: int = 4,
                 steps: int = 1, share: int | None = None, scale: float = 1.0) -> None:
        if not isinstance(factor, int) or factor < 2:
            raise MorphirError(f"mixture: factor must be an int >= 2, got {factor!r}")
        if init not in INITS:
            raise MorphirError(f"mixture: init must be one of {', '.join(INITS)}, got {init!r}")
        if templates < 1 or (init == "orthogonal" and templates < 2):
            raise MorphirError(f"mixture: templates must be at least {2 if init == 'orthogonal' else 1} "
                               f"(init={init!r}), got {templates}")
        if steps < 1 or (share is not None and share < 1) or not scale > 0:
            raise MorphirError(f"mixture: steps and share must be >= 1 and scale > 0, got {steps}, {share}, {scale}")
        self.factor, self.init, self.fuse, self.templates = factor, init, fuse, templates
        self.steps, self.share, self.scale = steps, share, scale

    def __repr__(self) -> str:
        return (f"<grower {self.name} factor={self.factor} init={self.init} fuse={self.fuse} "
                f"templates={self.templates} steps={self.steps}>")

    def finalize(self, graph: MorphGraph) -> MorphGraph:
        """A copy of ``graph`` with every mixed layer baked into a plain layer (:func:`bake`): the same
        function, no parametrizations, so ``torch.save(module)`` and any deployment path work.

        >>> plain = MixtureGrowth().finalize(result.graph)
        """
        if not mixed_layers(graph.module):
            return graph
        return _rebuilt(graph, bake(copy.deepcopy(graph.module)), "baking template mixing")

    def prepare(self, graph: MorphGraph, config: GrowConfig) -> MorphGraph:
        """The seed in template-mixing form (:func:`mix`), drawn from the run's seed.

        >>> g = MixtureGrowth().prepare(seed_graph, morphir.GrowConfig())
        """
        return mix(graph, templates=self.templates, share=self.share, seed=config.seed)

    def grow(self, step: GrowthStep) -> Growth:
        """Widen the net ``factor``× (training and fusing the other nets first at the first growth).

        >>> growth = MixtureGrowth().grow(step); growth.result.graph.num_params()
        """
        graph = step.graph
        layers = mixed_layers(graph.module)
        if not layers:
            raise MorphirError("mixture: the graph has no template-mixed layers; was it prepared by MixtureGrowth?")
        done = max(_mixer(m).growths for m in layers.values())
        if done >= self.steps:
            return Growth()
        fuse = self.fuse and done == 0
        others, losses = [], []
        for n in range(1, self.factor if fuse else 1):
            net, loss = self._train_other(step, n)
            others.append(net)
            losses.append(loss)
        grown = _widen(graph, self.factor, 1 + len(others), others, self.init, self.scale, step.generator(salt=1000))
        if step.config.recalibrate:
            recalibrate_batch_norm(grown.module, step.batches)
        entry = {"morphism": self.name, "factor": self.factor, "nets": 1 + len(others),
                 "layers": _shape_record(grown.module)}
        info: dict[str, Any] = {"applied": {self.name: 1}, "mixture_factor": self.factor,
                                "mixture_nets": 1 + len(others), "mixture_init": self.init,
                                "mixture_other_train_loss": losses}
        log.info("mixture: widened %dx%s; %d -> %d params", self.factor,
                 f", fused {len(others)} more net(s) (final train loss {losses})" if others else "",
                 graph.num_params(), grown.num_params())
        return Growth(result=PassResult(graph=grown, modified=True, applied=(), param_edits={}), log=[entry],
                      chosen=[], info=info)

    def _train_other(self, step: GrowthStep, n: int) -> tuple[nn.Module, float]:
        """Net n: the current architecture from scratch, trained as long as phase 1 with the run's SGD."""
        cfg = step.config
        module = copy.deepcopy(step.graph.module).to(_CPU)
        _reinitialise(module, step.generator(salt=n))
        opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
        loss = float("nan")
        seed = int(torch.randint(0, 2**62, (1,), generator=step.generator(salt=100 + n)))
        with torch.random.fork_rng(devices=[]):
            for e in range(cfg.phase_epochs):
                for group in opt.param_groups:  # phase 1's part of the run's cosine
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * e / max(cfg.epochs, 1)))
                torch.manual_seed(seed + e)
                try:
                    loss = train_epoch(module, opt, step.train, step.loss_fn, device=_CPU,
                                       where=f"MixtureGrowth's net {n + 1}, epoch {e + 1}")
                except TrainingError as exc:
                    raise TrainingError(f"{exc} (training the net to fuse)") from None
        module.eval()
        return module, loss

    def replay(self, graph: MorphGraph, entries: Sequence[Mapping[str, Any]], registry: Registry) -> MorphGraph:
        """Rebuild the structure of one logged growth step (weights are loaded afterwards).

        >>> graph = MixtureGrowth().replay(graph, result.log[0], registry)
        """
        for e in entries:
            if e.get("morphism") != self.name:
                raise CheckpointError(f"the checkpoint applies {e.get('morphism')!r}, not a MixtureGrowth step")
            graph = _widen(graph, int(e["factor"]), int(e["nets"]), None, self.init, self.scale, None)
            got = _shape_record(graph.module)
            if got != dict(e["layers"]):
                raise CheckpointError("the replayed MixtureGrowth step builds other layers than the checkpoint's "
                                      "(it was made from a different model or with other templates)")
        return graph
