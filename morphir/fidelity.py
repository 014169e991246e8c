"""The fidelity check: does a traced graph compute what its model computes?

The model and the graph are run side by side on the same inputs, in eval mode and in train mode
(each run under the same random state, so dropout and stochastic depth draw the same masks), with
a hook on every submodule the graph calls. Each call's output is compared in execution order,
then the outputs: the first difference names the submodule where the two part ways, so a graph
with a mode frozen into it (``self.training`` read while tracing) fails here, at trace time,
and not later as a preservation error that blames a morphism.

>>> fid = check_fidelity(model, graph.module, (x,), graph.probe_inputs)
>>> fid.eval_error, fid.train_error, fid.leaves
(0.0, 0.0, ('blocks.0.drop_path',))
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from morphir.errors import TraceError

__all__ = ["Fidelity", "check_fidelity", "sample_scaling", "FIDELITY_RTOL"]

log = logging.getLogger(__name__)

FIDELITY_RTOL = 1e-5
"""A graph output may differ from the model's by this share of the output's largest magnitude."""

_SEED = 20241108


@dataclass(frozen=True)
class Fidelity:
    """What the fidelity check found: the largest output difference per mode (None: not checked,
    with the reason in ``notes``), the submodules kept whole because they read their training flag,
    and the ``forward`` arguments fixed to their defaults."""

    eval_error: float | None
    train_error: float | None
    leaves: tuple[str, ...] = ()
    fixed_args: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (what ``morphir inspect --json`` prints).

        >>> graph.fidelity.as_dict()["eval_error"]
        0.0
        """
        return {"eval_error": self.eval_error, "train_error": self.train_error, "leaves": list(self.leaves),
                "fixed_args": list(self.fixed_args), "notes": list(self.notes)}

    def __str__(self) -> str:
        def mode(name: str, err: float | None) -> str:
            return f"{name} not checked" if err is None else f"{name} max |Δ| {err:.3g}"

        text = f"graph = model ({mode('eval', self.eval_error)}, {mode('train', self.train_error)})"
        if self.leaves:
            text += f"; kept whole (they read their training flag): {', '.join(self.leaves)}"
        if self.fixed_args:
            text += f"; fixed to their defaults: {', '.join(self.fixed_args)}"
        return text + "".join(f"; {n}" for n in self.notes)


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max |a − b|, max |a|)`` over finite entries; NaN or infinity where only one has it is ∞."""
    if a.shape != b.shape:
        return float("inf"), 0.0
    if not (a.is_floating_point() or a.is_complex()):
        return (0.0 if torch.equal(a, b) else float("inf")), 0.0
    a64, b64 = a.detach().double(), b.detach().double()
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs().nan_to_num(nan=float("inf")))
    finite = a64[torch.isfinite(a64)]
    return (float(diff.max()) if diff.numel() else 0.0), (float(finite.abs().max()) if finite.numel() else 0.0)


def _close(a: Any, b: Any) -> tuple[bool, float]:
    """Whether two (nested) values agree within :data:`FIDELITY_RTOL`, and the largest difference."""
    xs, ys = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)], [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(xs) != len(ys):
        return False, float("inf")
    worst, ok = 0.0, True
    for x, y in zip(xs, ys):
        err, mag = _difference(x, y)
        worst = max(worst, err)
        ok &= err <= FIDELITY_RTOL * mag
    return ok, worst


def _run(module: nn.Module, names: Sequence[str], inputs: tuple[Any, ...], *, train: bool,
         kwargs: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, list[Any]]]:
    """``module(*inputs)`` in the given mode under a fixed random state, with each call's output of the
    submodules ``names`` recorded (cloned, so in-place ops after the call do not change it)."""
    calls: dict[str, list[Any]] = defaultdict(list)

    def hook(name: str):
        def record(mod: nn.Module, args: Any, out: Any) -> None:
            calls[name].append(torch.utils._pytree.tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out))
        return record

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    devices = sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})
    try:
        module.train(train)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_SEED)
            out = module(*inputs, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return out, calls


def _called(gm: fx.GraphModule) -> list[str]:
    return list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))


def _origin(gm: fx.GraphModule, node: fx.Node) -> str:
    """Where the code that feeds ``node`` lives: the submodules whose traced (non-module) code lies
    between ``node`` and the module calls before it, innermost first."""
    scopes: dict[str, str] = {}
    todo, seen = list(node.all_input_nodes), set()
    while todo:
        n = todo.pop()
        if n in seen or n.op in ("call_module", "placeholder", "get_attr"):
            continue
        seen.add(n)
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            path, klass = list(stack.values())[-1]
            scopes.setdefault(str(path), getattr(klass, "__name__", str(klass)))
        todo.extend(n.all_input_nodes)
    if not scopes:
        return f"the code of {type(gm).__name__}.forward"
    ranked = sorted(scopes.items(), key=lambda kv: -kv[0].count("."))[:3]
    return "the code of " + " or ".join(f"submodule {p!r} ({k})" for p, k in ranked)


def _advice(where: str) -> str:
    return (f"The difference arises in {where}, which depends on something torch.fx froze while tracing (a "
            "flag, a shape, a global): mark that submodule as a leaf (trace(..., leaf_modules=[...])).")


def _compare(model: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...], *, train: bool,
             kwargs: Mapping[str, Any]) -> float | None:
    """Run both in one mode and return the largest output difference (None: the model itself raises
    on ``inputs`` in this mode); TraceError at the first disagreement, naming where it arises."""
    mode = "train" if train else "eval"
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    names = list(dict.fromkeys(str(n.target) for n in calls))
    try:
        want, want_calls = _run(model, names, inputs, train=train, kwargs=kwargs)
    except Exception:  # noqa: BLE001 - the model cannot run in this mode on these inputs
        return None
    try:
        got, got_calls = _run(gm, names, inputs, train=train)
    except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
        raise TraceError(f"the traced graph fails in {mode} mode where the model runs: {type(exc).__name__}: "
                         f"{exc}") from exc
    count: dict[str, int] = defaultdict(int)
    for node in calls:  # in the graph's order: the first call that differs is where the two part ways
        name, k = str(node.target), count[str(node.target)]
        count[name] += 1
        what = f"submodule {name!r} ({type(model.get_submodule(name)).__name__})"
        a, b = want_calls.get(name, []), got_calls.get(name, [])
        if k >= len(a) or k >= len(b):
            raise TraceError(f"the traced graph is not the model in {mode} mode: the model calls {what} {len(a)} "
                             f"time(s), the graph {len(b)}. " + _advice(_origin(gm, node)))
        ok, err = _close(a[k], b[k])
        if not ok:
            raise TraceError(f"the traced graph is not the model in {mode} mode: the output of {what} (call "
                             f"{k + 1}) differs by {err:.3g}. " + _advice(_origin(gm, node)))
    missing = [n for n in names if len(want_calls.get(n, [])) != len(got_calls.get(n, []))]
    if missing:
        raise TraceError(f"the traced graph is not the model in {mode} mode: the model calls submodule "
                         f"{missing[0]!r} {len(want_calls.get(missing[0], []))} time(s), the graph "
                         f"{len(got_calls.get(missing[0], []))}.")
    ok, err = _close(want, got)
    if not ok:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        raise TraceError(f"the traced graph is not the model in {mode} mode: its outputs differ by {err:.3g}, "
                         "though every submodule call agrees. " + _advice(_origin(gm, output)))
    return err


def check_fidelity(
    model: nn.Module,
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    probe_inputs: tuple[Any, ...],
    *,
    leaves: Sequence[str] = (),
    fixed: Sequence[str] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Fidelity:
    """Compare ``gm`` with ``model`` in eval mode on the example inputs and in train mode (same random
    state) on them too, or on the probe batch where the model cannot train on the example batch (a
    batch norm over a batch of one). ``kwargs`` (the ``concrete_args`` the graph was traced with)
    are passed to the model. Neither ``model`` nor ``gm`` is changed: both run on copies.

    Raises:
        TraceError: a submodule call, a call count or an output differs; the message names it.

    >>> check_fidelity(model, morphir.trace(model, x).module, (x,), probe).train_error
    0.0
    """
    notes: list[str] = []
    eval_error = _compare(copy.deepcopy(model), copy.deepcopy(gm), example_inputs, train=False, kwargs=kwargs or {})
    if eval_error is None:
        raise TraceError("the model raises on its example inputs in eval mode; pass inputs it accepts")
    train_error: float | None = None
    for inputs in (example_inputs, probe_inputs):
        train_error = _compare(copy.deepcopy(model), copy.deepcopy(gm), inputs, train=True, kwargs=kwargs or {})
        if train_error is not None:
            break
    else:
        notes.append("train mode not checked: the model raises in train mode on the example and the probe batch")
    log.debug("fidelity: eval %.3g, train %s", eval_error, train_error)
    return Fidelity(eval_error, train_error, tuple(leaves), tuple(fixed), tuple(notes))


@torch.no_grad()
def sample_scaling(gm: fx.GraphModule, name: str, inputs: tuple[Any, ...]) -> bool:
    """Whether submodule ``name`` of ``gm`` has no parameters, is the identity in eval mode and, in
    train mode, multiplies each sample by one number (stochastic depth, drop-path), on ``inputs``.

    Such a module passes channels through: growing or pruning them cannot change what it does.

    >>> sample_scaling(graph.module, "blocks.0.drop_path", graph.probe_inputs)
    True
    """
    module = gm.get_submodule(name)
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    seen: list[Any] = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args))
    flags = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        gm(*inputs)
    finally:
        handle.remove()
        for m, flag in flags.items():
            m.training = flag
    if not seen or len(seen[0]) != 1 or not isinstance(seen[0][0], torch.Tensor):
        return False
    x = seen[0][0]
    if x.dim() < 1 or x.shape[0] < 2 or not x.is_floating_point():
        return False
    copied = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        y_eval = copied.eval()(x.clone())
        y_train = copied.train()(x.clone())
    if not (isinstance(y_eval, torch.Tensor) and isinstance(y_train, torch.Tensor)):
        return False
    if y_eval.shape != x.shape or y_train.shape != x.shape or not torch.equal(y_eval, x):
        return False
    flat_x, flat_y = x.reshape(x.shape[0], -1).double(), y_train.reshape(x.shape[0], -1).double()
    scale = (flat_y * flat_x).sum(1) / (flat_x * flat_x).sum(1).clamp_min(1e-300)
    residual = (flat_y - scale[:, None] * flat_x).abs().max()
    return bool(residual <= 1e-5 * flat_x.abs().max())
