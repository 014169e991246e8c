"""Batch handling, one implementation for the whole package: a batch's inputs as positional
arguments, how many samples it holds, a device move, eval mode with every submodule's own mode
restored, and the mean loss over batches.

>>> with eval_mode(graph.module):
...     loss = mean_loss(graph.module, batches, F.cross_entropy)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["as_args", "batch_size", "eval_mode", "mean_loss", "to_device"]

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def to_device(x: Any, device: torch.device | None) -> Any:
    """``x`` (a tensor or a tuple of them) on ``device``; anything else, or ``device=None``, as it is.

    >>> x, y = to_device((x, y), torch.device("cuda"))
    """
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(to_device(t, device) for t in x)
    return x


def as_args(x: Any) -> tuple[Any, ...]:
    """A batch's inputs as the module's positional arguments: a tuple as it is, anything else alone.

    >>> module(*as_args(x))
    """
    return x if isinstance(x, tuple) else (x,)


def batch_size(x: Any, y: Any) -> int:
    """How many samples a batch holds, the one rule every mean over batches weights by: the first
    input tensor's dim 0, else ``len(y)``, else 1.

    >>> batch_size(torch.zeros(8, 3, 32, 32), torch.zeros(8))
    8
    """
    for t in as_args(x):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return len(y) if hasattr(y, "__len__") else 1


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block, each one's own mode restored
    after it (a submodule frozen in eval mode stays so).

    >>> with eval_mode(graph.module), torch.no_grad():
    ...     y = graph.module(x)
    """
    training = [m for module in modules for m in module.modules() if m.training]
    for m in training:
        object.__setattr__(m, "training", False)  # what Module.eval() sets, minus its per-call overhead
    try:
        yield
    finally:
        for m in training:
            object.__setattr__(m, "training", True)


@torch.no_grad()
def mean_loss(module: torch.nn.Module, batches: Iterable[tuple[Any, Any]], loss_fn: LossFn, *,
              device: torch.device | None = None) -> float:
    """The mean loss of ``module`` over ``batches`` in eval mode, each batch weighted by its
    :func:`batch_size`; the modules' modes are restored. No batches: 0.

    >>> mean_loss(graph.module, held_out, F.cross_entropy)
    0.37
    """
    total, count = 0.0, 0
    with eval_mode(module):
        for x, y in batches:
            x, y = to_device(x, device), to_device(y, device)
            n = batch_size(x, y)
            total += float(loss_fn(module(*as_args(x)), y)) * n
            count += n
    return total / max(count, 1)
