"""Load the model morphir should grow: from a ``torch.save`` file or from the zoo.

Loading is safe by default. A file written by ``torch.save(model, path)`` is a pickle,
and unpickling arbitrary classes runs code from the file. :func:`load_model` therefore
lists every global the file needs (``torch.serialization.get_unsafe_globals_in_checkpoint``)
and lets through, automatically, only ``torch.nn``'s own classes (plus the plain functions
of ``torch.nn.functional``, which modules such as ``TransformerEncoderLayer`` keep as
attributes). Everything else PyTorch's weights-only unpickler already allows (tensors,
``collections.OrderedDict``, ``set``, ``torch.Size``, dtypes, ...) needs nothing extra.
The allowed classes are passed to ``torch.serialization.safe_globals`` for this one load
only, so no process-wide state is changed.

A file that needs anything else (a model class of your own, a ``torch.fx.GraphModule``)
is refused with :class:`~morphir.errors.LoadError` unless the caller opts in with
``allow_pickle=True`` (``--allow-pickle`` on the command line).

Example::

    from morphir.load import load_model, resolve_model

    model = load_model("runs/net.pt")                      # torch.save(model, "runs/net.pt")
    model = resolve_model("zoo:vgg19", input_shape=(3, 32, 32), num_classes=10)
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from morphir.errors import LoadError

__all__ = ["load_model", "resolve_model", "ZOO_PREFIX"]

logger = logging.getLogger(__name__)

#: Prefix of a model spec that names a zoo model instead of a file, e.g. ``"zoo:vgg19"``.
ZOO_PREFIX = "zoo:"

_DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (3, 32, 32)

# Start of every file written by torch.save(..., _use_new_zipfile_serialization=False):
# pickle protocol 2, LONG1 of 10 bytes, torch's magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"

_HOW_TO_SAVE = "save the model itself with torch.save(model, path)"
_HOW_TO_ALLOW = (
    "pass --allow-pickle on the command line, or allow_pickle=True to "
    "morphir.load.load_model / morphir.load.resolve_model"
)


# --------------------------------------------------------------------------- helpers


def _is_torch_nn_module_name(module_name: object) -> bool:
    return isinstance(module_name, str) and (
        module_name == "torch.nn" or module_name.startswith("torch.nn.")
    )


def _resolve_global(name: str) -> Any | None:
    """Import the object a pickle global ``name`` (``"pkg.mod.Qual.Name"``) refers to.

    Tries the longest importable module prefix, then walks the remaining attributes.
    Returns ``None`` when nothing resolves. Importing is only ever attempted for names
    under ``torch.nn``, whose modules torch has already imported.
    """
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    return None


def _torch_nn_global(name: str) -> Any | None:
    """The object for ``name`` if it is one of torch.nn's own classes (or an
    ``torch.nn.functional`` function); ``None`` if it must not be allowed automatically."""
    if not _is_torch_nn_module_name(name):
        return None  # never import anything outside torch.nn just to inspect it
    obj = _resolve_global(name)
    if obj is None:
        return None
    owner = getattr(obj, "__module__", None)
    if isinstance(obj, type):
        return obj if _is_torch_nn_module_name(owner) else None
    # Plain functions of torch.nn.functional (e.g. F.relu kept as an activation attribute).
    if owner == "torch.nn.functional" and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        return obj
    return None


def _read_header(path: str, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _check_file(path: str) -> str:
    """Check that ``path`` looks like a torch.save file; return its format
    (``"zip"`` or ``"legacy"``) or raise :class:`LoadError` saying what is wrong."""
    if not os.path.exists(path):
        raise LoadError(
            f"model file {path!r} does not exist; check the path, or {_HOW_TO_SAVE}, "
            f"or use a zoo model with '{ZOO_PREFIX}NAME'"
        )
    if os.path.isdir(path):
        raise LoadError(
            f"model path {path!r} is a directory, not a file; give the file written by "
            f"torch.save(model, path)"
        )
    try:
        size = os.path.getsize(path)
        header = _read_header(path)
    except OSError as exc:
        raise LoadError(
            f"model file {path!r} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from exc
    if size == 0:
        raise LoadError(
            f"model file {path!r} is empty (0 bytes); the save was probably interrupted: "
            f"{_HOW_TO_SAVE} again"
        )
    if header.startswith(_LEGACY_MAGIC):
        return "legacy"
    if not header.startswith(_ZIP_MAGIC):
        what = (
            "a plain Python pickle, not a torch.save file"
            if header[:1] == b"\x80"
            else "not a PyTorch file written by torch.save"
        )
        raise LoadError(f"model file {path!r} is {what}; {_HOW_TO_SAVE}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()  # every member's CRC: a file changed in place fails here
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise LoadError(
            f"model file {path!r} is truncated or corrupt ({exc}); the save was probably "
            f"interrupted or the copy is incomplete: {_HOW_TO_SAVE} again"
        ) from exc
    if damaged is not None:
        raise LoadError(
            f"model file {path!r} is corrupt: its member {damaged!r} does not match its checksum (the file was "
            f"changed or damaged after it was written); {_HOW_TO_SAVE} again"
        )
    if any(n.endswith("/constants.pkl") for n in names):
        raise LoadError(
            f"model file {path!r} is a TorchScript archive (torch.jit.save); morphir rewrites "
            f"torch.fx graphs of the Python model: {_HOW_TO_SAVE}"
        )
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise LoadError(
            f"model file {path!r} is a zip archive but not one written by torch.save; "
            f"{_HOW_TO_SAVE}"
        )
    return "zip"


def _corrupt(path: str, exc: BaseException) -> LoadError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LoadError(
        f"model file {path!r} could not be read as a torch.save file, it is probably truncated "
        f"or corrupt ({type(exc).__name__}: {detail}); {_HOW_TO_SAVE} again"
    )


def _needs_pickle_error(path: str, foreign: list[str]) -> LoadError:
    listed = ", ".join(foreign)
    return LoadError(
        f"model file {path!r} needs globals that are not torch.nn's own classes: {listed}. "
        f"Loading them runs code from the file, so only do it for files you trust. "
        f"To allow it, {_HOW_TO_ALLOW}."
    )


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _check_module(path: str, obj: object) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if _is_state_dict(obj):
        raise LoadError(
            f"model file {path!r} holds a state_dict (a dict of tensors), not a model; morphir "
            f"needs the model itself: {_HOW_TO_SAVE}, or use a zoo model with '{ZOO_PREFIX}NAME'"
        )
    if isinstance(obj, Mapping):
        nested = [
            k for k, v in obj.items() if isinstance(v, nn.Module) or _is_state_dict(v)
        ]
        hint = (
            f" (its entries {', '.join(map(repr, nested))} hold a model or a state_dict)"
            if nested
            else ""
        )
        raise LoadError(
            f"model file {path!r} holds a {type(obj).__name__} with keys "
            f"{', '.join(map(repr, list(obj)[:8]))}{'...' if len(obj) > 8 else ''}{hint}, "
            f"not an nn.Module; {_HOW_TO_SAVE}, or use a zoo model with '{ZOO_PREFIX}NAME'"
        )
    kind = type(obj)
    kind_name = kind.__qualname__
    if kind.__module__ != "builtins":
        kind_name = f"{kind.__module__}.{kind.__qualname__}"
    raise LoadError(
        f"model file {path!r} holds a {kind_name} object, not a torch.nn.Module; {_HOW_TO_SAVE}"
    )


def _load_unsafe(path: str) -> object:
    logger.warning(
        "loading %r with full pickle (allow_pickle=True): this runs code from the file; "
        "only do it for files you trust",
        path,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise LoadError(
            f"model file {path!r} refers to code that cannot be imported here ({exc}); make "
            f"the package that defines the model importable (e.g. on PYTHONPATH) and retry"
        ) from exc
    except Exception as exc:  # unpickling may raise anything; never leak it bare
        raise _corrupt(path, exc) from exc


# --------------------------------------------------------------------------- public API


def load_model(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> nn.Module:
    """Load a model written by ``torch.save(model, path)`` onto the CPU.

    The file is inspected before unpickling. torch.nn's own classes are allowed for this
    load only (``torch.serialization.safe_globals``); any other class or function the file
    needs makes the load fail with :class:`LoadError`, unless ``allow_pickle=True``, which
    falls back to full (unsafe) unpickling and logs a warning. The module is returned as
    saved: its train/eval mode is not changed.

    Args:
        path: file written by ``torch.save(model, path)``.
        allow_pickle: allow full unpickling (runs code from the file; trusted files only).

    Returns:
        The loaded ``nn.Module``, with its tensors on the CPU.

    Raises:
        LoadError: the file is missing, a directory, empty, truncated, corrupt, not a
            torch.save file, holds a state_dict or another non-module object, or needs
            unsafe unpickling without ``allow_pickle=True``.

    Example::

        torch.save(nn.Sequential(nn.Linear(4, 2)), "net.pt")
        model = load_model("net.pt")
        custom = load_model("mine.pt", allow_pickle=True)  # a file you trust only
    """
    if not isinstance(path, (str, os.PathLike)):
        raise LoadError(f"load_model expects a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise LoadError(f"load_model expects a text path, got {type(path).__name__} {path!r}")
    fmt = _check_file(path)

    if fmt == "legacy":
        # The pre-1.6 format cannot be inspected ahead of time; try a strict load.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not allow_pickle:
                raise LoadError(
                    f"model file {path!r} uses torch's legacy (pre-1.6) format, whose "
                    f"classes cannot be checked before loading, and a weights-only load "
                    f"refused it. Loading it runs code from the file, so only do it for "
                    f"files you trust: {_HOW_TO_ALLOW}; or re-save it with a current torch "
                    f"(torch.save(model, path))."
                ) from exc
            obj = _load_unsafe(path)
        except Exception as exc:
            raise _corrupt(path, exc) from exc
        return _check_module(path, obj)

    try:
        needed = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as exc:
        raise _corrupt(path, exc) from exc

    allowed: list[tuple[Any, str]] = []
    foreign: list[str] = []
    for name in needed:
        obj = _torch_nn_global(name)
        if obj is None:
            foreign.append(name)
        else:
            allowed.append((obj, name))
    logger.debug(
        "%s: globals needed %s; allowed as torch.nn %d, foreign %s",
        path, needed, len(allowed), foreign,
    )

    if foreign:
        if not allow_pickle:
            raise _needs_pickle_error(path, foreign)
        return _check_module(path, _load_unsafe(path))

    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            obj = _load_unsafe(path)
        elif "Weights only load failed" not in str(exc):
            raise _corrupt(path, exc) from exc
        else:
            reason = next(
                (ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln),
                "it needs something the weights-only unpickler does not allow",
            )
            raise LoadError(
                f"model file {path!r} was refused by torch's weights-only unpickler ({reason}). "
                f"Loading it fully runs code from the file, so only do it for files you "
                f"trust: {_HOW_TO_ALLOW}."
            ) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    module = _check_module(path, obj)
    logger.info("loaded %s from %r (weights-only)", type(module).__name__, path)
    return module


def resolve_model(
    spec: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    allow_pickle: bool = False,
    widths: tuple[int, ...] | None = None,
) -> nn.Module:
    """Turn a model spec into a module: ``"zoo:NAME"`` builds a zoo model, anything else is
    a file path given to :func:`load_model`.

    Args:
        spec: ``"zoo:NAME"`` or the path of a ``torch.save(model, path)`` file; a base width may
            follow a colon (``"zoo:vgg19:4"``), the mlp's hidden widths too (``"zoo:mlp:16,16"``).
        input_shape: ``(C, H, W)`` for zoo models (any shape for the mlp); default ``(3, 32, 32)``.
            Ignored for files.
        widths: the mlp's hidden widths when the spec gives none (default one layer of 16).
        num_classes: number of outputs of a zoo model. Ignored for files.
        allow_pickle: passed to :func:`load_model` (trusted files only).

    Raises:
        LoadError: an empty or unknown zoo name, or any :func:`load_model` failure.

    Example::

        model = resolve_model("zoo:vgg19", input_shape=(1, 8, 8), num_classes=10)
        model = resolve_model("runs/net.pt")
    """
    if isinstance(spec, str) and spec.startswith(ZOO_PREFIX):
        from morphir import zoo  # lazy: the zoo pulls in model definitions

        name = spec[len(ZOO_PREFIX):].strip()
        if not name:
            raise LoadError(
                f"model spec {spec!r} names no zoo model; use '{ZOO_PREFIX}NAME' with NAME one "
                f"of: {', '.join(zoo.names())}"
            )
        shape = tuple(input_shape) if input_shape is not None else _DEFAULT_INPUT_SHAPE
        name, _, given = name.partition(":")
        width = None
        if given:
            try:
                sizes = tuple(int(w) for w in given.split(","))
            except ValueError:
                raise LoadError(f"model spec {spec!r}: the widths must be integers, e.g. zoo:vgg19:8 or "
                                "zoo:mlp:16,16") from None
            if name == "mlp":
                widths = sizes
            elif len(sizes) == 1:
                width = sizes[0]
            else:
                raise LoadError(f"model spec {spec!r}: only the mlp takes several widths (zoo:mlp:16,16); "
                                f"{name} takes one base width (zoo:{name}:8)")
        logger.info("building zoo model %r (input_shape=%s, num_classes=%d)", name, shape,
                    num_classes)
        try:
            if name == "mlp":
                return zoo.build(name, input_shape=shape, num_classes=num_classes, widths=widths)
            return zoo.build(name, input_shape=shape, num_classes=num_classes, width=width)  # LoadError if unknown
        except ValueError as exc:
            raise LoadError(f"model spec {spec!r}: {exc}") from None
    return load_model(spec, allow_pickle=allow_pickle)
