"""Plain training and evaluation loops (SGD with Nesterov momentum), used before scoring.

>>> losses = fit(graph.module, train_loader, F.cross_entropy, epochs=5)
>>> val_loss, val_acc = evaluate(graph.module, val_loader, F.cross_entropy)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from morphir.errors import MorphirError

__all__ = ["fit", "evaluate"]

log = logging.getLogger(__name__)


def fit(
    module: torch.nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> list[float]:
    """Train ``module`` in place with SGD (Nesterov); returns the mean training loss per epoch.

    A NaN or infinite loss stops training with :class:`MorphirError` naming the epoch and step.

    >>> fit(model, train_loader, F.cross_entropy, epochs=3)
    [1.9, 0.8, 0.4]
    """
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    history = []
    module.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = loss_fn(module(x), y)
            if not math.isfinite(loss.item()):
                raise MorphirError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                   "lower the learning rate or check the data")
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        history.append(total / max(count, 1))
        log.info("epoch %d: train loss %.4f", epoch + 1, history[-1])
    module.eval()
    return history


@torch.no_grad()
def evaluate(
    module: torch.nn.Module, batches: Iterable[tuple[Any, Any]], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``module`` in eval mode over ``batches`` (accuracy by argmax).

    >>> evaluate(model, val_loader, F.cross_entropy)
    (0.31, 0.93)
    """
    was_training = module.training
    module.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            out = module(x)
            total += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    finally:
        module.train(was_training)
    return total / max(count, 1), correct / max(count, 1)
