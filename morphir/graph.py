"""Tracing a model into a :class:`MorphGraph`: a torch.fx graph with shapes, probes and channel groups.

>>> import torch, morphir
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> g = morphir.trace(net, torch.randn(1, 4))
>>> [grp.name for grp in g.groups if grp.growable]
['0']
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from morphir.batches import eval_mode
from morphir.channels import ChannelAnalysis, ChannelRules, Layout, analyse
from morphir.errors import AnalysisError, TraceError

if TYPE_CHECKING:
    from morphir.fidelity import Fidelity

__all__ = ["MorphGraph", "LeafPolicy", "make_probe", "check_probe"]

log = logging.getLogger(__name__)

META_PREFIX = "morphir."
PERSISTENT_META = frozenset({"morphir.created_by"})  # provenance survives rewrites
PROBE_BATCH = 8

LeafPolicy = Callable[[torch.nn.Module, str], "bool | None"]
"""A callable ``(module, qualified_name) -> True | False | None``; None defers to torch.fx's default."""


class MorphGraph:
    """A traced network ready for morphisms.

    Holds the runnable :class:`torch.fx.GraphModule` (``.module``), the example inputs it was traced
    with, a fixed random *probe batch* used to verify rewrites, and the channel analysis (``.groups``),
    computed lazily and dropped whenever the graph changes.

    >>> g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8)), torch.randn(1, 1, 8, 8))
    >>> g.module(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        module: fx.GraphModule,
        example_inputs: tuple[Any, ...],
        *,
        probe_inputs: tuple[Any, ...] | None = None,
        rules: ChannelRules | None = None,
        history: Sequence[str] = (),
        fidelity: Fidelity | None = None,
    ):
        self.module = module
        self.example_inputs = tuple(example_inputs)
        self.probe_inputs = tuple(probe_inputs) if probe_inputs is not None else make_probe(self.example_inputs)
        self.rules = rules if rules is not None else ChannelRules.default()
        self.history: tuple[str, ...] = tuple(history)
        self.fidelity = fidelity  # what morphir.trace's fidelity check found (None: not checked)
        self._analysis: ChannelAnalysis | None = None
        self._incoming: dict[Any, Any] = {}  # per group: the producers' incoming shapes, and their numel
        self._probe_cache: tuple[Any, Any] | None = None
        self._noise_cache: tuple[Any, Any] | None = None  # morphir.verify.noise_profile's
        self._valid_meta: set[str] = set()
        self.propagate_shapes()

    # -- running -----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def run_probe(self, inputs: tuple[Any, ...] | None = None) -> Any:
        """Run the module in eval mode on the probe batch (or ``inputs``), restoring its mode.

        The output on the probe batch is cached until a parameter or buffer changes
        (tracked by tensor versions, so training in place invalidates it).

        >>> y = g.run_probe()
        """
        if inputs is None:
            key = self._state_key()
            if self._probe_cache is not None and self._probe_cache[0] == key:
                return self._probe_cache[1]
            out = self._run(self.probe_inputs)
            self._probe_cache = (key, out)
            return out
        return self._run(inputs)

    def _state_key(self) -> tuple:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return (self.module.code, tuple((id(t), t._version) for t in tensors))

    def _run(self, inputs: tuple[Any, ...]) -> Any:
        with eval_mode(self.module):
            return self.module(*inputs)

    def propagate_shapes(self) -> None:
        """Record tensor shapes on every node (``node.meta['tensor_meta']``) from the example inputs.

        Runs in eval mode without gradients, so batch-norm statistics are not touched.
        """
        quiet = contextlib.redirect_stderr(io.StringIO())  # ShapeProp prints tracebacks
        try:
            with eval_mode(self.module), torch.no_grad(), quiet:
                ShapeProp(self.module).propagate(*self.example_inputs)
        except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
            shapes = [tuple(t.shape) for t in self.example_inputs if isinstance(t, torch.Tensor)]
            cause = exc
            while cause.__cause__ is not None:  # ShapeProp wraps the op's error with a traceback text
                cause = cause.__cause__
            node = getattr(exc, "node", None) or ""
            lines = [line for line in str(cause).strip().splitlines() if line.strip()]
            reason = f"{type(cause).__name__}: {lines[-1] if lines else cause}"
            raise TraceError(
                f"the example inputs (shapes {shapes}) do not fit the model{f' at {node}' if node else ''}: {reason}. "
                "Pass example inputs of the shape the model expects (e.g. --input-shape 1,3,32,32)."
            ) from exc

    # -- structure -----------------------------------------------------------------------------
    @property
    def analysis(self) -> ChannelAnalysis:
        """The channel analysis of the current graph (cached until the graph changes)."""
        if self._analysis is None:
            self._analysis = analyse(self.module, self.rules)
        return self._analysis

    @property
    def groups(self) -> tuple:
        """Coupled channel groups, in topological order of their first producer.

        >>> [(grp.name, grp.width, grp.growable) for grp in g.groups][:2]
        """
        return tuple(self.analysis.groups.values())

    def group(self, name: str):
        """The channel group called ``name`` (its first producer's module name)."""
        try:
            return self.analysis.groups[name]
        except KeyError:
            known = ", ".join(self.analysis.groups) or "none"
            raise AnalysisError(f"no channel group named {name!r}; groups are: {known}") from None

    def node(self, name: str) -> fx.Node:
        """The fx node called ``name``."""
        for n in self.module.graph.nodes:
            if n.name == name:
                return n
        raise AnalysisError(f"no node named {name!r} in the graph of {type(self.module).__name__}")

    def shape(self, node: fx.Node | str) -> torch.Size | None:
        """The output shape recorded for ``node`` (from the example inputs), or None if not a tensor."""
        n = self.node(node) if isinstance(node, str) else node
        meta = n.meta.get("tensor_meta")
        return meta.shape if isinstance(meta, TensorMetadata) else None

    def layout(self, node: fx.Node | str) -> Layout | None:
        """Where the channels of ``node``'s output come from: axis and group segments, or None."""
        return self.analysis.layouts.get(node if isinstance(node, str) else node.name)

    def submodule(self, name: str) -> torch.nn.Module:
        """The submodule with qualified name ``name``."""
        return self.module.get_submodule(name)

    def num_params(self) -> int:
        """Number of parameters of the module."""
        return sum(p.numel() for p in self.module.parameters())

    # -- incoming weights of a group: the θ of splits and prunes -------------------------------
    def incoming_shapes(self, group: str) -> list[tuple[str, torch.Size]]:
        """``(producer module, shape of one channel's incoming weights)`` for each producer of ``group``."""
        if group not in self._incoming:
            grp = self.group(group)
            self._incoming[group] = [(p.module, self.submodule(p.module).weight.shape[1:]) for p in grp.producers]
        return self._incoming[group]

    def incoming_numel(self, group: str) -> int:
        """Total number of incoming weights of one channel of ``group`` over all its producers."""
        key = ("numel", group)
        if key not in self._incoming:
            self._incoming[key] = sum(int(torch.Size(s).numel()) for _, s in self.incoming_shapes(group))
        return self._incoming[key]

    def incoming_weights(self, group: str, channel: int) -> torch.Tensor:
        """The incoming weights of ``channel`` in ``group``, all producers, flattened into one vector.

        >>> w = g.incoming_weights("features.0", 3)   # a prune's default θ
        """
        grp = self.group(group)
        if not 0 <= channel < grp.width:
            raise AnalysisError(f"channel {channel} is outside group {group!r} of width {grp.width}")
        rows = [self.submodule(p.module).weight.detach()[channel].reshape(-1) for p in grp.producers]
        return torch.cat(rows) if rows else torch.zeros(0)

    def unflatten_incoming(self, group: str, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat vector (as from :meth:`incoming_weights`) into one row per producer module."""
        total = self.incoming_numel(group)
        if total != flat.numel():
            raise AnalysisError(
                f"θ for group {group!r} has {flat.numel()} entries; its producers have {total} incoming weights"
            )
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, shape in self.incoming_shapes(group):
            n = int(torch.Size(shape).numel())
            out[name] = flat[start : start + n].reshape(shape)
            start += n
        return out

    # -- outgoing weights of a group: what consumers read from one channel -------------------------
    def outgoing_shapes(self, group: str) -> list[tuple[str, torch.Size]]:
        """``(consumer module, shape of the weights it reads from one channel)`` for each consumer
        of ``group``: ``weight[:, features of the channel]``, i.e. ``(out, inner, *kernel)``.

        >>> g.outgoing_shapes("features.0")   # [('features.1.0', torch.Size([16, 1, 3, 3]))]
        """
        grp = self.group(group)
        out = []
        for c in grp.consumers:
            w = self.submodule(c.module).weight
            out.append((c.module, torch.Size([w.shape[0], c.segment.inner, *w.shape[2:]])))
        return out

    def outgoing_numel(self, group: str) -> int:
        """Total number of outgoing weights of one channel of ``group`` over all its consumers."""
        return sum(int(s.numel()) for _, s in self.outgoing_shapes(group))

    def outgoing_weights(self, group: str, channel: int) -> torch.Tensor:
        """The weights every consumer reads from ``channel`` of ``group``, flattened into one vector.

        >>> u = g.outgoing_weights("features.0", 3)
        """
        grp = self.group(group)
        if not 0 <= channel < grp.width:
            raise AnalysisError(f"channel {channel} is outside group {group!r} of width {grp.width}")
        parts = []
        for c in grp.consumers:
            start = c.segment.offset + channel * c.segment.inner
            parts.append(self.submodule(c.module).weight.detach()[:, start:start + c.segment.inner].reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten_outgoing(self, group: str, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat vector (as from :meth:`outgoing_weights`) into one block per consumer module; a
        module that reads the group at several places (``cat([pool(h), h])``) gets its blocks side by
        side along dim 1, in the order of the group's consumers."""
        shapes = self.outgoing_shapes(group)
        total = sum(int(s.numel()) for _, s in shapes)
        if total != flat.numel():
            raise AnalysisError(
                f"{flat.numel()} outgoing weights for group {group!r}; its consumers read {total} per channel"
            )
        parts: dict[str, list[torch.Tensor]] = {}
        start = 0
        for name, shape in shapes:
            n = int(shape.numel())
            parts.setdefault(name, []).append(flat[start : start + n].reshape(shape))
            start += n
        return {name: torch.cat(blocks, dim=1) for name, blocks in parts.items()}

    # -- metadata ------------------------------------------------------------------------------
    def set_meta(self, node: fx.Node | str, key: str, value: Any) -> None:
        """Attach ``value`` to ``node.meta[key]``; keys must start with ``morphir.``."""
        if not key.startswith(META_PREFIX):
            raise AnalysisError(f"metadata key {key!r} must start with {META_PREFIX!r}")
        n = self.node(node) if isinstance(node, str) else node
        n.meta[key] = value
        self._valid_meta.add(key)

    def is_valid(self, key: str) -> bool:
        """Whether ``key`` was written since the graph last changed."""
        return key in self._valid_meta

    def invalidate(self, key: str | None = None) -> None:
        """Drop metadata ``key`` (or every ``morphir.*`` key) from all nodes, and the cached analysis."""
        for n in self.module.graph.nodes:
            stale = [k for k in n.meta if k.startswith(META_PREFIX) and k not in PERSISTENT_META]
            for k in [k for k in stale if key is None or k == key]:
                del n.meta[k]
        if key is None:
            self._valid_meta.clear()
            self._analysis = None
            self._incoming = {}
            self._probe_cache = None
            self._noise_cache = None
        else:
            self._valid_meta.discard(key)

    # -- copies ------------------------------------------------------------------------------
    def copy(self) -> MorphGraph:
        """An independent deep copy (module, parameters, metadata)."""
        new = MorphGraph.__new__(MorphGraph)
        new.module = copy.deepcopy(self.module)
        new.example_inputs = self.example_inputs
        new.probe_inputs = self.probe_inputs
        new.rules = self.rules
        new.history = self.history
        new.fidelity = self.fidelity
        new._analysis = None
        new._incoming = {}
        new._probe_cache = None
        new._noise_cache = None
        new._valid_meta = set(self._valid_meta)
        return new

    def __repr__(self) -> str:
        n_nodes = len(self.module.graph.nodes)
        return f"MorphGraph({type(self.module).__name__}, {n_nodes} nodes, {self.num_params()} params)"


def make_probe(example_inputs: Sequence[Any], batch: int = PROBE_BATCH, seed: int = 0, *,
               ranges: Sequence[tuple[int, int] | None] | None = None) -> tuple[Any, ...]:
    """A fixed random batch shaped like ``example_inputs`` (dim 0 widened to ``batch``).

    Floating inputs are drawn from N(0, 1); integer inputs uniformly from ``ranges[i]`` (inclusive)
    where given (e.g. ``(0, vocabulary − 1)`` for token ids), else from their observed range.

    >>> make_probe((torch.zeros(1, 3, 8, 8),))[0].shape
    torch.Size([8, 3, 8, 8])
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
            continue
        shape = (max(batch, x.shape[0]), *x.shape[1:])
        if x.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=x.dtype).to(x.device))
        elif x.is_complex():
            out.append(torch.randn(shape, generator=gen, dtype=x.dtype).to(x.device))
        elif x.dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool().to(x.device))
        else:
            given = ranges[i] if ranges is not None and i < len(ranges) else None
            lo, hi = given if given is not None else (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            out.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype).to(x.device))
    return tuple(out)


def check_probe(probe_inputs: Sequence[Any]) -> None:
    """Refuse a probe batch that could not show a broken rewrite: every tensor input with a batch
    dimension must hold at least two different samples, and floating inputs must be finite.

    Raises:
        TraceError: naming the input and what to pass instead.

    >>> check_probe((torch.randn(8, 3),))
    """
    tensors = [(i, x) for i, x in enumerate(probe_inputs) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors:
        raise TraceError("the probe batch has no tensor input with a batch dimension; rewrites could not be "
                         "checked on it: pass probe_inputs=(a batch of varied samples, ...) to morphir.trace")
    for i, x in tensors:
        what = f"probe input {i} ({x.dtype}, shape {tuple(x.shape)})"
        if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
            raise TraceError(f"{what} holds NaN or infinite values; pass finite probe_inputs to morphir.trace")
        if x.shape[0] < 2 or bool((x == x[:1]).all()):
            raise TraceError(
                f"{what} is the same in every sample, so a rewrite that changes the function could go unseen "
                "(an example input of one value, e.g. all-zero token ids, gives such a probe). Pass "
                "probe_inputs=(a batch of at least two different samples, ...) to morphir.trace, or example "
                "inputs that show the range of values the model takes."
            )
