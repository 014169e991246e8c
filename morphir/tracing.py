"""Tracing a model into a :class:`MorphGraph` that computes what the model computes.

``trace`` does three things beyond ``torch.fx.symbolic_trace``, each so that the graph morphir
rewrites is the model the user gave:

1. **Python-valued arguments are fixed.** ``forward`` parameters past the example inputs that
   have a default (``is_causal: bool = False``, ``mask=None``, flags) are fixed to it, so they
   become neither placeholders of the graph nor inputs of its ONNX export.
2. **Mode-dependent code stays live.** A first trace watches every submodule's ``training``
   flag. A submodule whose ``forward`` reads it, and whose traced code differs between train and
   eval mode (stochastic depth, drop-path, a batch norm with its own ``if self.training``
   branch), is kept whole as a leaf, so it goes on reading the mode instead of having one
   frozen into the graph. The root module cannot be a leaf: if its own code depends on the
   mode, :class:`TraceError` says so.
3. **The fidelity check** (:mod:`morphir.fidelity`) runs the model and the graph side by side in
   eval and in train mode, under the same random state, and compares every submodule call and
   the outputs; a difference is a :class:`TraceError` naming the submodule.

>>> import torch, morphir
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
>>> g = morphir.trace(net, torch.randn(1, 4))
>>> g.fidelity.eval_error, g.fidelity.train_error
(0.0, 0.0)
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
import re
import os
import traceback
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from morphir.channels import ChannelRules
from morphir.errors import TraceError
from morphir.fidelity import check_fidelity, sample_scaling
from morphir.graph import LeafPolicy, MorphGraph, check_probe, make_probe

__all__ = ["trace"]

log = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    """torch.fx tracer whose leaf modules can be extended by types, qualified names or a policy.

    While a :class:`_ModeWatch` is attached it also keeps the stack of modules being traced, so a
    read of a ``training`` flag is charged to the module whose ``forward`` made it.
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset(),
                 policy: LeafPolicy | None = None):  # defaults: unpickling a saved GraphModule builds one bare
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self._policy = policy
        self.watch: _ModeWatch | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self._policy is not None:
            verdict = self._policy(m, module_qualified_name)
            if verdict is not None:
                return bool(verdict)
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.watch is None:
            return super().call_module(m, forward, args, kwargs)
        self.watch.stack.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.watch.stack.pop()


class _ModeWatch:
    """Which module's ``forward`` reads which module's ``training`` flag, recorded during a trace.

    Every module of ``root`` is given, for the duration of the block, a subclass of its own class
    whose ``training`` is a property that records each read; the classes are restored after.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.stack: list[nn.Module] = []
        self.reads: dict[int, set[int]] = defaultdict(set)  # reader id -> ids of the modules read
        self._swapped: list[tuple[nn.Module, type]] = []

    def _record(self, owner: nn.Module) -> None:
        reader = self.stack[-1] if self.stack else self.root
        self.reads[id(reader)].add(id(owner))

    def __enter__(self) -> _ModeWatch:
        watch = self

        def get(module: nn.Module) -> bool:
            watch._record(module)
            return module.__dict__["training"]

        def put(module: nn.Module, value: bool) -> None:
            module.__dict__["training"] = value

        flag = property(get, put)
        made: dict[type, type | None] = {}
        for m in self.root.modules():
            cls = type(m)
            if cls not in made:
                try:
                    made[cls] = type(cls.__name__, (cls,), {"training": flag, "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
                except Exception:  # noqa: BLE001 - a class that cannot be subclassed is simply not watched
                    made[cls] = None
            watched = made[cls]
            if watched is None or "training" not in m.__dict__:
                continue
            try:
                m.__class__ = watched
            except TypeError:
                continue
            self._swapped.append((m, cls))
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, cls in reversed(self._swapped):
            m.__class__ = cls
        self._swapped.clear()


def _fixed_defaults(model: nn.Module, n_inputs: int, given: dict[str, Any] | None) -> dict[str, Any]:
    """``concrete_args``: ``given``, plus every parameter of ``forward`` past the first ``n_inputs``
    that has a default and is not given (it is fixed to its default)."""
    out = dict(given or {})
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return out
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for p in positional[n_inputs:] + [p for p in params if p.kind == p.KEYWORD_ONLY]:
        if p.name not in out and p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


@contextmanager
def _flipped(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Each module's own ``training`` flag inverted for the block (not its children's)."""
    mods = list(modules)
    for m in mods:
        m.training = not m.training
    try:
        yield
    finally:
        for m in mods:
            m.training = not m.training


def _mode_dependent(tracer: _Tracer, source: nn.Module, base: str, reads: dict[int, set[int]],
                    concrete: dict[str, Any] | None) -> list[nn.Module]:
    """The readers of ``training`` flags whose traced code changes when the flags they read flip."""
    by_id = {id(m): m for m in source.modules()}

    def code_if_flipped(owner_ids: Iterable[int]) -> str:
        with _flipped(by_id[i] for i in set(owner_ids) if i in by_id):
            return _code(tracer.trace(source, concrete_args=concrete))

    if code_if_flipped(i for owners in reads.values() for i in owners) == base:
        return []
    return [by_id[r] for r, owners in reads.items() if r in by_id and code_if_flipped(owners) != base]


def _embedding_ranges(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[tuple[int, int] | None]:
    """For each integer input that an embedding reads directly: ``(0, num_embeddings - 1)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: list[tuple[int, int] | None] = []
    for node, x in zip(placeholders, inputs):
        high = None
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool:
            for user in node.users:
                if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.Embedding):
                    high = gm.get_submodule(str(user.target)).num_embeddings - 1
                elif user.op == "call_function" and user.target is torch.nn.functional.embedding:
                    weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
                    meta = getattr(weight, "meta", {}).get("tensor_meta")
                    high = meta.shape[0] - 1 if meta is not None else None
        out.append((0, high) if high is not None else None)
    return out


def trace(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    *,
    leaf_modules: Iterable[type | str] = (),
    leaf_policy: LeafPolicy | None = None,
    concrete_args: dict[str, Any] | None = None,
    rules: ChannelRules | None = None,
    probe_inputs: Sequence[Any] | None = None,
    check: bool = True,
) -> MorphGraph:
    """Trace ``model`` into a :class:`MorphGraph` that computes what ``model`` computes.

    ``leaf_modules`` (module types or qualified names) and ``leaf_policy`` are kept as single
    nodes instead of being traced through; ``concrete_args`` fixes Python-valued arguments (those
    past the example inputs with a default are fixed to it unless given here). Submodules whose
    code depends on their ``training`` flag become leaves of their own accord (see the module
    docstring). With ``check`` the graph is compared with the model in eval and train mode
    (:func:`morphir.fidelity.check_fidelity`); the result is ``graph.fidelity``. The model itself is
    never modified: the graph owns a copy of its parameters.

    Raises:
        TraceError: the model cannot be traced, the example inputs do not fit it, the probe batch
            is degenerate, or the graph does not compute what the model computes.

    >>> g = morphir.trace(morphir.zoo.build("resnet20", (3, 32, 32)), torch.randn(1, 3, 32, 32))
    >>> g.module.graph.lint()
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple[Any, ...] = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        inputs = tuple(example_inputs)
    else:
        raise TraceError(f"example_inputs must be a tensor or a non-empty tuple of the model's inputs, got "
                         f"{type(example_inputs).__name__}")
    if any(isinstance(x, torch.Tensor) and x.is_complex() for x in inputs):
        raise TraceError("complex example inputs are not supported: morphir's checks and growth work on real "
                         "tensors; split them into real and imaginary parts")
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    concrete = _fixed_defaults(model, len(inputs), concrete_args) or None
    source = copy.deepcopy(model)
    try:
        tracer, fx_graph, auto_leaves = _trace_keeping_modes(source, leaf_types, leaf_names, leaf_policy, concrete)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes a TraceError with a location
        raise TraceError(_explain_trace_failure(model, exc)) from exc
    _drop_fixed_placeholders(fx_graph, set(concrete or {}))
    for node in fx_graph.nodes:
        # string annotations (``from __future__ import annotations``) become string globals of the
        # generated code, which GraphModule cannot pickle: drop them, they carry no semantics here
        if isinstance(node.type, str):
            node.type = None
    gm = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
    gm.training = model.training  # submodules keep the flags they had in the model
    if probe_inputs is None:
        probe_inputs = make_probe(inputs, ranges=_embedding_ranges(gm, inputs))
    check_probe(probe_inputs)
    rules = rules if rules is not None else ChannelRules.default()
    graph = MorphGraph(gm, inputs, probe_inputs=probe_inputs, rules=rules)
    if check:
        graph.fidelity = check_fidelity(model, gm, inputs, tuple(probe_inputs), leaves=auto_leaves,
                                        fixed=sorted(set(concrete or {}) - set(concrete_args or {})),
                                        kwargs=concrete_args)
    graph.rules = _rules_for_leaves(graph, auto_leaves)
    return graph


def _trace_keeping_modes(source: nn.Module, leaf_types: tuple[type, ...], leaf_names: frozenset[str],
                         policy: LeafPolicy | None, concrete: dict[str, Any] | None
                         ) -> tuple[_Tracer, fx.Graph, list[str]]:
    """Trace ``source``, watching every ``training`` read; trace again with the submodules whose code
    depends on their mode as leaves. Returns the tracer, the graph and those leaves."""
    tracer = _Tracer(leaf_types, leaf_names, policy)
    tracer.watch = _ModeWatch(source)
    with tracer.watch:
        fx_graph = tracer.trace(source, concrete_args=concrete)
    reads, tracer.watch = dict(tracer.watch.reads), None
    if not reads:
        return tracer, fx_graph, []
    names = {id(m): name for name, m in source.named_modules()}
    readers = _mode_dependent(tracer, source, _code(fx_graph), reads, concrete)
    if any(r is source for r in readers):
        raise TraceError(
            f"{type(source).__name__}.forward reads self.training and traces to a different graph in train and "
            "eval mode; morphir keeps one graph for both modes. Move the mode-dependent code into a submodule "
            "(which morphir then keeps whole), or build the model without it (e.g. without auxiliary training "
            "heads)."
        )
    leaves = sorted(names[id(r)] for r in readers)
    if not leaves:
        return tracer, fx_graph, []
    log.info("kept whole, as they read their training flag: %s", ", ".join(leaves))
    tracer = _Tracer(leaf_types, leaf_names | frozenset(leaves), policy)
    return tracer, tracer.trace(source, concrete_args=concrete), leaves


def _drop_fixed_placeholders(graph: fx.Graph, names: set[str]) -> None:
    """Remove the placeholders torch.fx keeps for fixed arguments, with the guards it hangs on them
    (``x == default`` asserts): the graph's signature is then the example inputs alone, which is
    also what ONNX exports (the guards, traced again by an exporter, become tensor ops it rejects)."""
    guards = {torch._assert, operator.eq, getattr(torch.fx._symbolic_trace, "_assert_is_none", None)}
    def fixed(ph: fx.Node) -> bool:  # fx renames a fixed argument's placeholder (is_causal -> is_causal_1)
        return ph.target in names or re.sub(r"_\d+$", "", str(ph.target)) in names

    for ph in [n for n in graph.nodes if n.op == "placeholder" and fixed(n)]:
        chain, todo = [], list(ph.users)
        while todo:
            n = todo.pop()
            if n in chain:
                continue
            if not (n.op == "call_function" and n.target in guards):
                break
            chain.append(n)
            todo.extend(n.users)
        else:
            for n in sorted(chain, key=lambda n: -list(graph.nodes).index(n)):
                graph.erase_node(n)
            if not ph.users:
                graph.erase_node(ph)
    graph.lint()


def _rules_for_leaves(graph: MorphGraph, leaves: Sequence[str]) -> ChannelRules:
    """``graph.rules``, extended for the mode-reading leaves that have no rule: one that scales whole
    samples (stochastic depth, drop-path: measured on the probe batch) passes its channels through."""
    from morphir.channel_rules import passthrough

    rules = graph.rules
    nodes = {str(n.target): n for n in graph.module.graph.nodes if n.op == "call_module"}
    for name in leaves:
        module = graph.submodule(name)
        if name not in nodes or rules.rule_for(nodes[name], module) is not None:
            continue
        if sample_scaling(graph.module, name, graph.probe_inputs):
            rules = rules.with_module(type(module), passthrough(nonlinear=False))
            log.info("%s (%s) scales whole samples: its channels pass through", name, type(module).__name__)
    return rules


def _explain_trace_failure(model: torch.nn.Module, exc: BaseException) -> str:
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "morphir"] or frames
    where = ""
    if frames:
        f = frames[-1]
        code = (f.line or "").strip()
        where = f" at {f.filename}:{f.lineno}" + (f" `{code}`" if code else "") + f" (in {f.name})"
    return (
        f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}{where}. "
        "Data-dependent Python (if/for on tensor values, tensor-valued shapes) cannot be traced: "
        "mark the module that contains it as a leaf (trace(..., leaf_modules=[ThatModule]) or "
        "leaf_policy=...), or fix the Python-valued arguments with concrete_args={...}."
    )
