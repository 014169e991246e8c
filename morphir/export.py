"""Shipping a grown network: ONNX files checked in onnxruntime, ``torch.export`` programs, compiled copies.

Every file is built in memory first (and, for ONNX, checked in onnxruntime), then written to a
temporary file next to ``path`` and moved into place, so a failure (a rejected op, a failed
check, a full disk) never leaves a half-written file at ``path`` and never removes one that was
already there.

>>> import torch, morphir
>>> from morphir.export import export_onnx
>>> g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8)), torch.randn(1, 1, 8, 8))
>>> export_onnx(g, "grown.onnx").name   # checked in onnxruntime at two batch sizes
'grown.onnx'
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from morphir.batches import eval_mode
from morphir.errors import ExportError
from morphir.files import atomic_write
from morphir.graph import MorphGraph

__all__ = ["export_onnx", "export_program", "compile", "check_onnx"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Model = MorphGraph | torch.nn.Module


# -- helpers ----------------------------------------------------------------------------------------
def _resolve(model: Model, example_inputs: Any, what: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """The module to export and its example inputs as a tuple (a MorphGraph supplies its own)."""
    if isinstance(model, MorphGraph):
        module = model.module
        if example_inputs is None:
            example_inputs = model.example_inputs
    elif isinstance(model, torch.nn.Module):
        module = model
        if example_inputs is None:
            raise ExportError(
                f"{what}: a plain {type(model).__name__} has no example inputs; pass example_inputs "
                "(a tensor or a tuple of tensors of the shape the model expects), or pass a MorphGraph."
            )
    else:
        raise ExportError(
            f"{what}: expected a MorphGraph or a torch.nn.Module, got {type(model).__name__}."
        )
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs:
        raise ExportError(f"{what}: example_inputs is empty; pass at least one input tensor.")
    return module, inputs


def _input_names(n: int) -> list[str]:
    return ["input"] + [f"input_{i}" for i in range(1, n)]


def _output_names(n: int) -> list[str]:
    return ["output"] + [f"output_{i}" for i in range(1, n)]


def _flatten(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in the order the ONNX exporter lists them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    return []


@torch.no_grad()
def _run_torch(module: torch.nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with eval_mode(module):
        return [t.detach().cpu() for t in _flatten(module(*inputs))]


def _at_batch(inputs: tuple[torch.Tensor, ...], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs like ``inputs`` but with batch size ``batch``.

    Floating inputs are drawn from a seeded normal; others (indices, masks) tile the example rows.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device))
        else:
            rows = torch.arange(batch, device=t.device) % t.shape[0]
            out.append(t[rows])
    return tuple(out)


def _write_bytes(path: PathLike, what: str, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file beside it, moved into place when complete.

    Serialising happens before, in memory, so a full disk is a plain OSError here (never an abort
    inside a C++ writer); on any failure ``path`` is left as it was.
    """
    target = pathlib.Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise ExportError(
            f"cannot write {what} to {target}: directory {directory} does not exist or is not a "
            "directory; create it first or choose another path."
        )
    try:
        atomic_write(target, lambda f: f.write(data))
    except OSError as exc:
        raise ExportError(f"cannot write {what} to {target}: {exc.strerror or exc}. Free space, or choose a "
                          "writable directory or another path.") from exc
    return target


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """Attention without its fused fast path: under no_grad in eval mode ``nn.MultiheadAttention``
    calls ``aten::_native_multi_head_attention``, which ONNX cannot express; the plain path computes
    the same with ops it can."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def _routed_warnings() -> Iterator[None]:
    """Route the exporters' warnings to this module's logger instead of stderr.

    Deprecation notices (the TorchScript exporter announces its own deprecation) go to DEBUG,
    everything else (tracer warnings, which can mean a wrong export) to WARNING.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                deprecation = issubclass(w.category, (DeprecationWarning, FutureWarning))
                level = logging.DEBUG if deprecation else logging.WARNING
                log.log(level, "exporter: %s: %s", w.category.__name__, w.message)


# -- ONNX -------------------------------------------------------------------------------------------
ONNX_ATOL = 1e-5
ONNX_RTOL = 1e-4


def export_onnx(
    model: Model,
    path: PathLike,
    example_inputs: Any = None,
    *,
    check: bool = True,
    atol: float = ONNX_ATOL,
    rtol: float = ONNX_RTOL,
    opset: int = 17,
) -> pathlib.Path:
    """Export ``model`` to an ONNX file with a dynamic batch dimension, checked in onnxruntime.

    ``model`` is a :class:`MorphGraph` (its example inputs are used unless ``example_inputs`` is given)
    or a ``torch.nn.Module`` (then ``example_inputs``, a tensor or tuple of tensors, is required).
    The export runs in eval mode (the module's mode is restored after) with TorchScript's exporter,
    attention on its plain (not fused) path; inputs are named ``input``, ``input_1``, …, outputs
    ``output``, ``output_1``, …, and dimension 0 of each is the symbolic ``batch``. The file is
    built in memory and, with ``check``, run by :func:`check_onnx`'s comparison before anything is
    written, so a file that does not match the module is never written.

    Raises:
        ExportError: no example inputs, an op the exporter rejects, an unwritable directory or a
            full disk, or (with ``check``) outputs that are not finite or differ from torch's by more
            than ``atol + rtol · max |y|``.

    >>> g = morphir.trace(morphir.zoo.build("resnet20", (1, 8, 8)), torch.randn(1, 1, 8, 8))
    >>> export_onnx(g, "resnet20.onnx", rtol=1e-4)
    PosixPath('resnet20.onnx')
    """
    module, inputs = _resolve(model, example_inputs, "export_onnx")
    _tolerances(atol, rtol)
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"export_onnx: path must be a str or os.PathLike, got {type(path).__name__}")
    target = pathlib.Path(path)
    bad = [type(t).__name__ for t in inputs if not isinstance(t, torch.Tensor)]
    if bad:
        raise ExportError(
            f"cannot export {target}: ONNX inputs must be tensors, got {', '.join(bad)}; "
            "pass example_inputs as a tensor or a tuple of tensors."
        )
    try:
        n_outputs = len(_run_torch(module, inputs))
    except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
        shapes = [tuple(t.shape) for t in inputs]
        raise ExportError(
            f"cannot export {target}: the module fails on the example inputs (shapes {shapes}): {exc}"
        ) from exc
    in_names, out_names = _input_names(len(inputs)), _output_names(n_outputs)
    dynamic_axes = {name: {0: "batch"} for name, t in zip(in_names, inputs) if t.dim() > 0}
    dynamic_axes.update({name: {0: "batch"} for name in out_names})
    buffer = io.BytesIO()
    try:
        with eval_mode(module), _routed_warnings(), _exportable(), torch.no_grad():
            torch.onnx.export(
                module,
                inputs,
                buffer,
                dynamo=False,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
            )
    except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
        raise ExportError(
            f"cannot export {target} to ONNX (opset {opset}): {type(exc).__name__}: {_first_line(exc)}. "
            "Replace the op it names with one ONNX supports (or pass the opset the exporter names for it, "
            f"if it names one); nothing was written to {target}."
        ) from exc
    data = buffer.getvalue()
    if check:
        try:
            _check(data, module, inputs, atol=atol, rtol=rtol, label=target)
        except ExportError as exc:
            raise ExportError(f"{exc} Nothing was written to {target}.") from exc
    _write_bytes(target, "the ONNX file", data)
    log.info("exported %s (opset %d, inputs %s)", target, opset, in_names)
    return target


def _tolerances(atol: float, rtol: float) -> None:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ExportError(f"{name} must be a finite number >= 0, got {value!r}")


def check_onnx(path: PathLike, model: Model, example_inputs: Any = None, *, atol: float = ONNX_ATOL,
               rtol: float = ONNX_RTOL) -> float:
    """Run an ONNX file in onnxruntime and compare it with ``model`` in eval mode; return the max |Δ|.

    Each output must lie within ``atol + rtol · max |y|`` of torch's (y: that output in torch), at
    the example inputs and at a second, different batch size (deterministic random inputs of the
    same shape and dtype otherwise), which also checks that the batch is dynamic. Outputs that are
    NaN or infinite in torch fail: nothing can be checked against them. ``model`` is a MorphGraph
    (``example_inputs`` then defaults to its own) or an ``nn.Module``.

    Raises:
        ExportError: the file does not load or run, torch's outputs are not finite, or an output
            differs by more than the tolerance.

    >>> check_onnx("resnet20.onnx", g) < 1e-4
    True
    """
    module, inputs = _resolve(model, example_inputs, "check_onnx")
    _tolerances(atol, rtol)
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"check_onnx: path must be a str or os.PathLike, got {type(path).__name__}")
    file = pathlib.Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {file}: {exc.strerror or exc}") from exc
    return _check(data, module, inputs, atol=atol, rtol=rtol, label=file)


def _check(
    data: bytes, module: torch.nn.Module, inputs: tuple[Any, ...], *, atol: float, rtol: float,
    label: pathlib.Path
) -> float:
    import onnxruntime as ort  # imported here: a heavy import only checks need

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
        raise ExportError(f"onnxruntime cannot load {label}: {_first_line(exc)}") from exc
    feeds_names = [i.name for i in session.get_inputs()]
    names = _input_names(len(inputs))

    batches: list[tuple[Any, ...]] = [inputs]
    if all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        size = inputs[0].shape[0]
        batches.append(_at_batch(inputs, size + 2 if size != 1 else 3))

    worst = 0.0
    for batch in batches:
        try:
            expected = _run_torch(module, batch)
        except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
            shapes = [tuple(t.shape) for t in batch]
            raise ExportError(f"{label}: the module fails on inputs of shapes {shapes}: {type(exc).__name__}: "
                              f"{_first_line(exc)}; pass example inputs the model accepts") from exc
        at = f"at batch {batch[0].shape[0] if batch[0].dim() else '-'}"
        for i, e in enumerate(expected):
            if e.is_floating_point() and not bool(torch.isfinite(e).all()):
                raise ExportError(f"{label}: the module's output {i} holds NaN or infinite values {at}, so "
                                  "nothing can be checked against it; fix the model (its weights or inputs) first.")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, batch) if n in feeds_names}
        try:
            got = session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
            shapes = [tuple(t.shape) for t in batch]
            raise ExportError(f"onnxruntime cannot run {label} on inputs of shapes {shapes}: {_first_line(exc)}") from exc
        if len(got) != len(expected):
            raise ExportError(
                f"{label} has {len(got)} outputs but the module returns {len(expected)}; re-export it."
            )
        for i, (g, e) in enumerate(zip(got, expected)):
            e_np = e.numpy()
            if g.shape != e_np.shape:
                raise ExportError(
                    f"{label}: output {i} has shape {g.shape} in onnxruntime but {tuple(e_np.shape)} in torch "
                    f"{at}; re-export with a dynamic batch."
                )
            if not g.size:
                continue
            g64, e64 = g.astype(np.float64), e_np.astype(np.float64)
            diff = float(np.nan_to_num(np.abs(g64 - e64), nan=np.inf).max())
            worst = max(worst, diff)
            tol = atol + rtol * float(np.abs(e64).max())
            if not diff <= tol:
                raise ExportError(
                    f"{label} does not match the module: output {i} differs by max |Δ| = {diff:.3g} {at}, more "
                    f"than atol + rtol · max |y| = {atol:.3g} + {rtol:.3g} · {float(np.abs(e64).max()):.3g} "
                    "(onnxruntime vs torch, eval mode). Check the file was exported from this module, or raise "
                    "rtol/atol (--onnx-rtol, --onnx-atol) if the difference is numerical noise."
                )
    log.debug("checked %s: max |Δ| = %.3g (atol %.3g, rtol %.3g)", label, worst, atol, rtol)
    return worst


# -- torch.export -----------------------------------------------------------------------------------
def export_program(model: Model, path: PathLike, example_inputs: Any = None) -> pathlib.Path | None:
    """Save ``model`` as a ``torch.export`` program (``.pt2``), or return None where it cannot be exported.

    Exports in eval mode with a dynamic batch dimension (``torch.export.Dim``); when the model
    pins its batch size, falls back to the static shapes of the example inputs. A model that
    ``torch.export`` rejects is logged as a warning with the reason and None is returned, so
    callers can write ``grown.pt2`` only where export works. Reload with ``torch.export.load``.

    Raises:
        ExportError: no example inputs, the directory is not writable, or the disk is full.

    >>> p = export_program(g, "grown.pt2")
    >>> torch.export.load(p).module()(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """
    module, inputs = _resolve(model, example_inputs, "export_program")
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"export_program: path must be a str or os.PathLike, got {type(path).__name__}")
    target = pathlib.Path(path)
    program = _export(module, inputs, target)
    if program is None:
        return None

    buffer = io.BytesIO()
    try:
        torch.export.save(program, buffer)
    except Exception as exc:  # noqa: BLE001 - turned into a typed error with context
        raise ExportError(f"cannot save the exported program to {target}: {_first_line(exc)}") from exc
    _write_bytes(target, "the exported program", buffer.getvalue())
    log.info("saved exported program %s", target)
    return target


def _export(module: torch.nn.Module, inputs: tuple[Any, ...], target: pathlib.Path) -> Any:
    """``torch.export.export`` with a dynamic batch if possible, else static; None if neither works."""
    dynamic_reason = "not tried"
    if all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        # torch.export specialises size-1 dimensions, so trace a dynamic batch at size >= 2
        traced = inputs if inputs[0].shape[0] >= 2 else tuple(torch.cat([t, t]) for t in inputs)
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs)
        try:
            with eval_mode(module), _routed_warnings():
                return torch.export.export(module, traced, dynamic_shapes=shapes)
        except Exception as exc:  # noqa: BLE001 - fall back to static shapes
            dynamic_reason = f"{type(exc).__name__}: {_first_line(exc)}"
            log.info("%s: dynamic-batch export failed (%s); trying static shapes", target, dynamic_reason)
    try:
        with eval_mode(module), _routed_warnings():
            program = torch.export.export(module, inputs)
    except Exception as exc:  # noqa: BLE001 - reported as a warning, by contract
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        also = "the same with a dynamic batch" if reason == dynamic_reason else f"dynamic batch: {dynamic_reason}"
        log.warning("not writing %s: torch.export cannot export the model: %s (%s)", target, reason, also)
        return None
    log.warning("%s is exported with a static batch size; the dynamic batch failed: %s", target, dynamic_reason)
    return program


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- compiled copies --------------------------------------------------------------------------------
def compile(  # noqa: A001 - shadows the builtin inside this module only, by design
    graph_or_module: Model,
    device: str | torch.device = "cpu",
    *,
    use_torch_compile: bool = False,
) -> torch.nn.Module:
    """A deployable copy of a grown network: deep-copied, recompiled, in eval mode, on ``device``.

    The input (a MorphGraph or module) is never modified. A GraphModule's copy is recompiled
    from its graph, so the Python code matches the graph after any rewrites; with
    ``use_torch_compile`` the copy is wrapped in ``torch.compile`` (compiled lazily at the first call).

    Raises:
        ExportError: ``device`` is not a valid device or is not available (e.g. "cuda" without CUDA).

    >>> fast = compile(g, "cpu")
    >>> fast(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """
    module = graph_or_module.module if isinstance(graph_or_module, MorphGraph) else graph_or_module
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"compile: expected a MorphGraph or a torch.nn.Module, got {type(module).__name__}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ExportError(f"compile: {device!r} is not a device ({exc}); use e.g. 'cpu' or 'cuda:0'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(
            f"compile: device {str(dev)!r} was asked for but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of torch."
        )
    copied = copy.deepcopy(module)
    if isinstance(copied, torch.fx.GraphModule):
        copied.recompile()
    copied.eval()
    try:
        copied = copied.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise ExportError(f"compile: cannot move the model to {str(dev)!r}: {exc}") from exc
    if use_torch_compile:
        with _routed_warnings():  # importing torch._dynamo raises torch.jit deprecation notices
            copied = torch.compile(copied)
    return copied
