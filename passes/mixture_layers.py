"""MixtureGrowth's template-mixing layers: a conv or linear layer whose weight is ``W = Σₖ αₖ Tₖ``,
the templates shared by adjacent layers of one shape (:func:`mix`), and :func:`bake`, which turns
them back into plain layers. The method: :mod:`morphir.passes.mixture`.

>>> mixed = mix(graph, gen=torch.Generator().manual_seed(0))   # every conv/linear mixes templates
>>> plain = bake(mixed.module)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from morphir.api import MorphGraph, MorphirError

__all__ = ["INITS", "Init", "TemplateMix", "bake", "mix", "mixed_layers"]

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
