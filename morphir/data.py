"""Data sources: scikit-learn's bundled digits (1,797 8×8 images, 10 classes), tensor files, or a
user function returning loaders.

>>> train, val = digits_loaders(seed=0, batch_size=64)
>>> x, y = next(iter(train)); x.shape
torch.Size([64, 1, 8, 8])
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from morphir.errors import DataError
from morphir.tasks import TASKS, build_task, digits_tensors

__all__ = ["Data", "digits_tensors", "digits_loaders", "load_data", "first_batch"]


def digits_loaders(*, seed: int = 0, batch_size: int = 64, val_fraction: float = 0.2) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over digits; the train loader shuffles with a seeded generator.

    >>> train, val = digits_loaders(seed=1, batch_size=32)
    """
    xt, yt, xv, yv = digits_tensors(seed=seed, val_fraction=val_fraction)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(xv, yv), batch_size=batch_size)
    return train, val


@dataclass(frozen=True)
class Data:
    """Training and validation batches from one source, and where they came from.

    ``train`` and ``val`` are re-iterable (a DataLoader or any iterable of ``(x, y)``); the train
    loader draws its shuffle from torch's global generator, so seeding it before an epoch fixes the
    order (:func:`morphir.grow` does). ``loss`` is the mean loss to train with, ``kind``
    ``"classification"`` (integer labels) or ``"regression"``; a bundled task names the hidden
    widths of its ``zoo:mlp`` seed (``seed_widths``).
    """

    train: Iterable[tuple[Any, Any]]
    val: Iterable[tuple[Any, Any]]
    source: str
    loss: Callable[..., torch.Tensor] = F.cross_entropy
    kind: str = "classification"
    seed_widths: tuple[int, ...] | None = None


def _tensor_pair(arrays: Mapping[str, Any], source: str, x_key: str, y_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = torch.as_tensor(arrays[x_key]), torch.as_tensor(arrays[y_key])
    except KeyError as exc:
        raise DataError(f"{source}: no array named {exc.args[0]!r}; a data file holds 'x' and 'y' "
                        "(and optionally 'x_val', 'y_val'); found: " + (", ".join(sorted(map(str, arrays))) or "nothing")) from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{source}: {x_key!r}/{y_key!r} are not numeric arrays: {exc}") from None
    if x.dim() < 2:
        raise DataError(f"{source}: {x_key!r} has shape {tuple(x.shape)}; expected (samples, features...) ")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{source}: {y_key!r} has shape {tuple(y.shape)}; expected one label per sample of "
                        f"{x_key!r} ({x.shape[0]})")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise DataError(f"{source}: {y_key!r} holds {y.dtype}; class labels must be integers")
    if x.is_complex():
        raise DataError(f"{source}: {x_key!r} holds complex numbers ({x.dtype}); morphir trains on real inputs: "
                        "split them into real and imaginary channels first")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{source}: {x_key!r} contains NaN or infinite values")
    if x.shape[0] == 0:
        raise DataError(f"{source}: {x_key!r} is empty")
    return x, y.long()


def _read_arrays(path: Path) -> Mapping[str, Any]:
    source = str(path)
    if not path.is_file():
        raise DataError(f"{source}: no such data file")
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad data file
        raise DataError(f"{source}: cannot read the data file ({type(exc).__name__}: {exc}); "
                        "write it with torch.save({'x': x, 'y': y}, path) or numpy.savez(path, x=x, y=y)") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{source}: holds a {type(obj).__name__}; expected a dict with 'x' and 'y'")
    return obj


def load_data(spec: str, *, seed: int = 0, batch_size: int = 64, val_fraction: float = 0.2) -> Data:
    """Training and validation data from ``spec``.

    ``digits``: scikit-learn's bundled set, split by ``seed``. ``teacher``, ``clusters``: the
    bundled tasks where width matters (:mod:`morphir.tasks`), drawn from ``seed``. ``FILE.pt`` (``torch.save`` of a
    dict) or ``FILE.npz``: arrays ``x`` and ``y`` (integer labels), and optionally ``x_val`` and
    ``y_val``; without them a ``val_fraction`` is held out by ``seed``. ``module:function``: an
    importable function (the current directory is searched first) returning ``(train, val)``
    re-iterable ``(x, y)`` batches (a DataLoader, a list). This imports and runs code: give only
    modules you trust. ``sys.path`` is restored afterwards, and an exception raised by the module or
    the function is a :class:`DataError` that names it.

    >>> data = load_data("digits", seed=0, batch_size=64)
    >>> data = load_data("teacher", seed=0)              # regression: data.loss is F.mse_loss
    >>> data = load_data("my_data.npz")
    >>> data = load_data("my_project.data:loaders")
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"a data source is a non-empty string ('digits', a file, module:function), got {spec!r}")
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise DataError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if spec == "digits":
        train, val = digits_loaders(seed=seed, batch_size=batch_size, val_fraction=val_fraction)
        return Data(_unseeded(train), val, "digits")
    if spec in TASKS:
        task = build_task(spec, seed=seed)
        return Data(_loader(TensorDataset(task.x_train, task.y_train), batch_size, task.train_transform),
                    DataLoader(TensorDataset(task.x_val, task.y_val), batch_size=batch_size), spec,
                    loss=task.loss, kind=task.kind, seed_widths=task.seed_widths or None)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".npz"):
        arrays = _read_arrays(path)
        x, y = _tensor_pair(arrays, spec, "x", "y")
        if "x_val" in arrays or "y_val" in arrays:
            xv, yv = _tensor_pair(arrays, spec, "x_val", "y_val")
            if xv.shape[1:] != x.shape[1:]:
                raise DataError(f"{spec}: 'x_val' samples have shape {tuple(xv.shape[1:])} but 'x' samples "
                                f"{tuple(x.shape[1:])}")
        else:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
            n_val = max(1, int(round(len(y) * val_fraction)))
            if n_val >= len(y):
                raise DataError(f"{spec}: {len(y)} samples are too few to hold out a validation set; add x_val, y_val")
            x, y, xv, yv = x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]
        if len(y) < 2:
            raise DataError(f"{spec}: {len(y)} training sample is too few to train on; add samples")
        train = _loader(TensorDataset(x, y), batch_size)
        return Data(train, DataLoader(TensorDataset(xv, yv), batch_size=batch_size), spec)
    if ":" in spec:
        return _from_function(spec)
    raise DataError(f"{spec!r} is not a data source; use 'digits', a bundled task ({', '.join(TASKS)}), a .pt or "
                    ".npz file with x and y, or module:function")


def _from_function(spec: str) -> Data:
    """``module:function``: import the module (the current directory searched first) and call the
    function. This runs the user's code; ``sys.path`` is left as it was found."""
    module_name, _, func_name = spec.partition(":")
    saved = list(sys.path)
    try:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - importing runs the user's code: any failure is theirs
            raise DataError(f"{spec}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); give "
                            "module:function with the module importable from the current directory") from None
        func = getattr(module, func_name, None)
        if not callable(func):
            raise DataError(f"{spec}: module {module_name!r} has no function {func_name!r}"
                            + ("" if func is None else f" (it is a {type(func).__name__})"))
        try:
            loaders = func()
        except Exception as exc:  # noqa: BLE001 - the user's function failed: say so, naming it
            raise DataError(f"{spec}: the data function {func_name}() raised {type(exc).__name__}: {exc}") from None
    finally:
        sys.path[:] = saved
    try:
        train, val = loaders
    except (TypeError, ValueError):
        raise DataError(f"{spec}: the data function must return (train, val) iterables of (x, y) batches, "
                        f"got {type(loaders).__name__}") from None
    for name, batches in (("train", train), ("val", val)):
        try:
            one_shot = iter(batches) is batches
        except TypeError:
            raise DataError(f"{spec}: the {name} data is a {type(batches).__name__}, not an iterable of (x, y) "
                            "batches") from None
        if one_shot:
            raise DataError(f"{spec}: the {name} data is an iterator (e.g. a generator), which can be read only "
                            "once; return a DataLoader or a list of (x, y) batches")
    return Data(train, val, spec)


def _loader(dataset: Any, batch_size: int,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DataLoader:
    """A shuffling loader over ``dataset`` (drawing from torch's global generator, seeded per epoch by
    the caller) that never yields a batch of one sample, on which batch norm cannot train: when the
    last batch would hold one, it is dropped (a different sample each epoch). ``transform``, if
    given, is applied to each batch's inputs as it is drawn (from the same global generator)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                      drop_last=len(dataset) > 1 and len(dataset) % batch_size == 1,
                      collate_fn=None if transform is None else _Transformed(transform))


class _Transformed:
    """A collate function: the default collation, then ``transform`` on the batch's inputs."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.transform = transform

    def __call__(self, samples: list[Any]) -> Any:
        x, y = torch.utils.data.default_collate(samples)
        return self.transform(x), y


def _unseeded(loader: DataLoader) -> DataLoader:
    """The same loader shuffling from torch's global generator (seeded per epoch by the caller)."""
    return _loader(loader.dataset, loader.batch_size)


def first_batch(batches: Iterable[tuple[Any, Any]], source: str) -> tuple[Any, Any]:
    """The first ``(x, y)`` of ``batches``, or a :class:`DataError` saying the source is empty or malformed."""
    try:
        item = next(iter(batches))
        x, y = item
    except StopIteration:
        raise DataError(f"{source}: yields no batches") from None
    except (TypeError, ValueError):
        raise DataError(f"{source}: batches must be (x, y) pairs") from None
    return x, y
