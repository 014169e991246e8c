"""The θ = 0 check: a rewrite that must preserve the function changes no activation beyond float noise.

A morphism's contract is local: at θ = 0 every activation outside the channels it edits is
unchanged, from its local output z (the consumers of an edited group, the users of an inserted
layer) up to the network's output. :func:`find_mismatch` checks exactly that. It runs the graph
before and after a rewrite side by side on the probe batch, node by node (so memory stays that of
one forward pass), and compares every node the two share: same name, same output shape, and no
channel of an edited group in its layout (those change shape or order by design). The first node
that differs is where the rewrite broke the function, whatever happens after it: a zero or tiny
classifier that hides the change from the network output does not hide it here.

What "differs" means is measured, not guessed. A node's tolerance is ``NOISE_FACTOR`` times its
float noise: how far the graph's own run at its precision lies from the same graph run in float64,
at that node (the largest deviation over the probe batch), and never less than one rounding unit
of the node's largest value (ε·max|y|). Nodes fed by cancelling sums get a larger tolerance, a
node whose values are tiny (a zero-initialised or 1e-7-scaled head) a tiny one; there is no
absolute floor that a small output could hide under. A rewrite also rounds the parameters it
writes, which moves a node by about its float noise, far below any real change. Where a graph
cannot run in float64 (an op pinned to float32), the noise is the rounding unit alone.

>>> m = find_mismatch(g, morphir.apply(g, cands, verify=False), edited=("features.0",))
>>> m is None
True
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from morphir.batches import eval_mode
from morphir.graph import MorphGraph

__all__ = ["Mismatch", "find_mismatch", "noise_profile", "NOISE_FACTOR"]

log = logging.getLogger(__name__)

NOISE_FACTOR = 100.0
"""A node may differ by this many times its float noise."""

_HIGH = torch.float64
_MISSING = object()


@dataclass(frozen=True)
class Mismatch:
    """The first node a rewrite changed: its name, what computes it, the largest change, the tolerance,
    and the node's spread over the probe batch (the RMS over features of each one's standard deviation)."""

    node: str
    what: str
    error: float
    tolerance: float
    spread: float

    def __str__(self) -> str:
        rel = f", {self.error / self.spread:.3g} of its spread over the probe batch" if self.spread > 0 else ""
        return f"{self.what} by {self.error:.3g}{rel} (tolerance {self.tolerance:.3g})"


class _Stepper(fx.Interpreter):
    """Runs a GraphModule one node at a time, freeing each value after its last use."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple[Any, ...]):
        super().__init__(gm, garbage_collect_values=False)
        self.args_iter: Iterator[Any] = iter(inputs)
        self.env: dict[fx.Node, Any] = {}
        self.order = list(gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.order)}
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.order):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.pos = 0

    def step(self) -> tuple[fx.Node, Any]:
        node = self.order[self.pos]
        value = self.run_node(node)
        self.env[node] = value
        for a in node.all_input_nodes:
            if self.last_use.get(a) == self.pos:
                del self.env[a]
        self.pos += 1
        return node, value

    def advance_to(self, name: str) -> Any:
        """The value of node ``name``, computing up to it; ``_MISSING`` if it was passed or is absent."""
        target = self.index.get(name)
        if target is None or target < self.pos - 1:
            return _MISSING
        if target == self.pos - 1:
            return self.env.get(self.order[target], _MISSING)
        while self.pos <= target:
            _, value = self.step()
        return value


def _to_float64(module: nn.Module) -> nn.Module:
    """``module`` with every floating parameter, buffer and tensor attribute in float64 (in place)."""
    module.double()
    for mod in module.modules():
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_floating_point():
                mod.__dict__[k] = v.double()
    return module


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    with eval_mode(*modules), torch.no_grad():
        yield


def _as_float64(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _floats(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _pairs(a: Any, b: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Matching floating tensors of two node values; None when their structure or shapes differ."""
    xs, ys = _floats(a), _floats(b)
    if len(xs) != len(ys) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(xs, ys)):
        return None
    return [(x, y) for x, y in zip(xs, ys) if x.is_floating_point()]


def _max_abs(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y|, with entries equal in both (infinities, NaN and NaN) counted as no difference."""
    if x.numel() == 0:
        return 0.0
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    diff = (x.double() - y.double()).abs().nan_to_num(nan=float("inf"))
    return float(torch.where(same, torch.zeros_like(diff), diff).max())


def _spread(t: torch.Tensor) -> float:
    if t.dim() == 0 or t.shape[0] < 2:
        return 0.0
    flat = t.double().reshape(t.shape[0], -1)
    flat = flat[:, torch.isfinite(flat).all(0)]
    return float(flat.var(0, unbiased=False).mean().sqrt()) if flat.numel() else 0.0


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def noise_profile(graph: MorphGraph) -> dict[str, float]:
    """Float noise per node on the probe batch: max |y − y₆₄| between the graph's run at its own
    precision and in float64, at least ε·max|y| (only the latter where float64 cannot run).
    Cached until the graph's code, parameters or buffers change.

    >>> noise_profile(g)["features_0_0"]
    2.4e-07
    """
    key = graph._state_key()
    cached = graph._noise_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    profile: dict[str, float] = {}
    with _evaluating(graph.module):
        try:
            high = _to_float64(copy.deepcopy(graph.module))
            with _evaluating(high):
                low_run, high_run = _Stepper(graph.module, graph.probe_inputs), _Stepper(high, _as_float64(graph.probe_inputs))
                for _ in range(len(low_run.order)):
                    node, lo = low_run.step()
                    _, hi = high_run.step()
                    noise = 0.0
                    for x, y in zip(_floats(lo), _floats(hi)):
                        if x.is_floating_point():
                            if y.dtype != _HIGH or x.shape != y.shape:
                                raise TypeError(f"node {node.name} computes {y.dtype} when run in float64")
                            noise = max(noise, _difference(x, y.to(x.dtype)), _eps(x.dtype) * _max_abs(x))
                    profile[node.name] = noise
        except Exception as exc:  # noqa: BLE001 - an op pinned to another dtype: the rounding unit alone
            log.debug("float noise from the rounding unit alone (the graph does not run in float64: %s)", exc)
            profile = {}
            run = _Stepper(graph.module, graph.probe_inputs)
            for _ in range(len(run.order)):
                node, value = run.step()
                profile[node.name] = max((_eps(t.dtype) * _max_abs(t) for t in _floats(value) if t.is_floating_point()),
                                         default=0.0)
    graph._noise_cache = (key, profile)
    return profile


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"the output of submodule {node.target!r} ({type(gm.get_submodule(str(node.target))).__name__}, node {node.name!r})"
    if node.op == "output":
        return "the network output"
    stack = node.meta.get("nn_module_stack") or {}
    where = f" in submodule {list(stack.values())[-1][0]!r}" if stack else ""
    target = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} (`{target}`{where})"


def find_mismatch(before: MorphGraph, after: MorphGraph, *, edited: Iterable[str] = ()) -> Mismatch | None:
    """The first node ``after`` computes differently from ``before`` on ``before``'s probe batch, or None.

    Compared: every node both graphs have (by name) with the same output shape, except those whose
    layout in ``before`` holds channels of a group in ``edited``; each against its own tolerance
    (see the module docstring). Neither graph is changed.

    >>> find_mismatch(g, morphir.apply(g, cands), edited={c.site.anchor for c in cands}) is None
    True
    """
    edited = set(edited)
    profile = noise_profile(before)
    skip = {name for name, lay in before.analysis.layouts.items() if any(s.group in edited for s in lay.segments)} \
        if edited else set()
    known = {n.name for n in before.module.graph.nodes}
    gm = after.module
    with _evaluating(before.module, gm):
        ref, new = _Stepper(before.module, before.probe_inputs), _Stepper(gm, before.probe_inputs)
        for _ in range(len(new.order)):
            node, z = new.step()
            if node.name not in known or node.name in skip or node.op in ("placeholder", "get_attr"):
                continue
            y = ref.advance_to(node.name)
            if y is _MISSING:
                continue
            pairs = _pairs(y, z)
            if pairs is None:
                continue
            for a, b in pairs:
                err = _difference(a, b)
                tol = NOISE_FACTOR * max(profile.get(node.name, 0.0), _eps(a.dtype) * _max_abs(a))
                if not err <= tol:
                    return Mismatch(node.name, _describe(gm, node), err, tol, _spread(a))
    return None
