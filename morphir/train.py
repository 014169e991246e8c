"""Training: plain training and evaluation loops (SGD with Nesterov momentum), the growth loop's
optimizer and cosine schedule, batch-norm recalibration and reinitialisation; used before scoring,
by the growth loop and by growers that train.

>>> losses = fit(graph.module, train_loader, F.cross_entropy, epochs=5)
>>> val_loss, val_acc = evaluate(graph.module, val_loader, F.cross_entropy)
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from morphir.batches import as_args, batch_size, eval_mode, to_device
from morphir.config import GrowConfig
from morphir.errors import DataError, TrainingError

__all__ = ["cosine_lr", "evaluate", "fit", "recalibrate_batch_norm", "reinitialise", "seed_for", "sgd", "show_progress",
           "train_epoch"]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def _call(module: torch.nn.Module, x: Any) -> Any:
    return module(*as_args(x))


def train_epoch(
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    where: str = "this epoch",
    device: torch.device | None = None,
) -> float:
    """One pass over ``batches`` in train mode; returns the mean training loss.

    A NaN or infinite loss raises :class:`TrainingError` naming ``where`` and the step; no batches
    at all raise :class:`DataError`.

    >>> train_epoch(model, opt, train_loader, F.cross_entropy, where="epoch 3")
    0.41
    """
    module.train()
    total, count = 0.0, 0
    for step, (x, y) in enumerate(batches):
        x, y = to_device(x, device), to_device(y, device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(_call(module, x), y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TrainingError(f"the loss function returned {shape} at {where}, step {step + 1}; it must return one "
                                "number, the batch's mean loss (e.g. F.cross_entropy with reduction='mean')")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the training loss became {value} at {where}, step {step + 1}")
        loss.backward()
        opt.step()
        n = batch_size(x, y)
        total += value * n
        count += n
    if count == 0:
        raise DataError(f"the training data yielded no batches at {where}")
    return total / count


def fit(
    module: torch.nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> list[float]:
    """Train ``module`` in place with SGD (Nesterov); returns the mean training loss per epoch.

    A NaN or infinite loss stops training with :class:`TrainingError` naming the epoch and step.

    >>> fit(model, train_loader, F.cross_entropy, epochs=3)
    [1.9, 0.8, 0.4]
    """
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    history = []
    for epoch in range(epochs):
        try:
            history.append(train_epoch(module, opt, batches, loss_fn, where=f"epoch {epoch + 1}"))
        except TrainingError as exc:
            raise TrainingError(f"{exc}; lower the learning rate or check the data") from None
        log.info("epoch %d: train loss %.4f", epoch + 1, history[-1])
    module.eval()
    return history


@torch.no_grad()
def evaluate(
    module: torch.nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    device: torch.device | None = None,
) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``module`` in eval mode over ``batches``, its mode restored.

    Accuracy is by argmax, and None unless the outputs are (N, classes) logits with integer labels.

    >>> evaluate(model, val_loader, F.cross_entropy)
    (0.31, 0.93)
    """
    total, correct, count, classify = 0.0, 0, 0, True
    with eval_mode(module):
        for x, y in batches:
            x, y = to_device(x, device), to_device(y, device)
            out = _call(module, x)
            n = batch_size(x, y)
            total += float(loss_fn(out, y)) * n
            if classify and isinstance(out, torch.Tensor) and out.dim() == 2 and not y.dtype.is_floating_point:
                correct += int((out.argmax(1) == y).sum())
            else:
                classify = False
            count += n
    if count == 0:
        raise DataError("the validation data yielded no batches")
    return total / count, (correct / count if classify else None)


# -- training -------------------------------------------------------------------------------------
def seed_for(seed: int, *where: int) -> int:
    """A seed derived from a run's ``seed`` and a place in the run (phase, epoch, step...), so every
    shuffle and draw can be replayed on resume.

    >>> torch.manual_seed(seed_for(cfg.seed, 0, epoch))   # the shuffle of that epoch
    """
    value = seed
    for w in where:
        value = (value * 1_000_003 + w + 1) % (2**62)
    return value


def sgd(module: nn.Module, cfg: GrowConfig) -> torch.optim.Optimizer:
    """The growth loop's optimizer: SGD with ``cfg``'s learning rate, momentum, Nesterov and weight decay.

    >>> opt = sgd(graph.module, GrowConfig(lr=0.05))
    """
    return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def cosine_lr(cfg: GrowConfig, epoch: int, total: int) -> float:
    """The learning rate ``epoch`` epochs into a cosine of ``total`` epochs from ``cfg.lr``.

    >>> cosine_lr(GrowConfig(lr=0.1), 5, 10)
    0.05
    """
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(total, 1)))


def show_progress(enabled: bool | None) -> bool:
    """Whether to draw progress bars: as asked, or (None) when stderr is a terminal.

    >>> show_progress(None)
    """
    return sys.stderr.isatty() if enabled is None else enabled


@torch.no_grad()
def recalibrate_batch_norm(module: nn.Module, batches: Iterable[tuple[Any, Any]]) -> int:
    """Re-estimate every batch norm's running statistics as the plain average over ``batches``
    (forward passes in train mode, no gradients); returns the number of batches used.

    >>> recalibrate_batch_norm(model, itertools.islice(train, 8))
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = module.training
    count = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        module.train()
        for x, _ in batches:
            module(*(x if isinstance(x, tuple) else (x,)))
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.train(was_training)
    return count


def reinitialise(module: nn.Module, seed: int) -> None:
    """Draw every parameter of ``module`` afresh (``reset_parameters``) and reset its batch-norm
    statistics, from ``seed``: the found architecture, from scratch.

    >>> reinitialise(copy.deepcopy(result.graph.module), seed=0)
    """
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
            m.reset_running_stats()

