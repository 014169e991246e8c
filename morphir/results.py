"""What a growth run returns: :class:`GrowResult`, its one-line phase summaries, and
:func:`retrain`, the found architecture trained from scratch (the paper's baseline).

>>> result = morphir.grow(model, train, val, F.cross_entropy)
>>> result.summary()["final_params"], morphir.retrain(result, train, val, F.cross_entropy)["val_loss"]
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphir.config import GrowConfig
from morphir.graph import MorphGraph
from morphir.scoring import LossFn
from morphir.selection import count_flops
from morphir.train import cosine_lr, evaluate, reinitialise, seed_for, sgd, show_progress, train_epoch

__all__ = ["GrowResult", "phase_summary", "retrain"]

log = logging.getLogger(__name__)


@dataclass
class GrowResult:
    """What a growth run produced: the grown graph, one metrics record per phase, the growth log.

    ``log[k]`` lists the morphisms applied after phase k+1 as ``{"morphism", "anchor", "index",
    "variant", "theta"}``; ``retrained`` is filled by :func:`retrain`.
    """

    graph: MorphGraph
    metrics: list[dict[str, Any]]
    log: list[list[dict[str, Any]]]
    seed_params: int
    seed_flops: int
    seconds: float
    config: GrowConfig
    retrained: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The run in a few numbers (what ``summary.json`` holds)."""
        last = self.metrics[-1] if self.metrics else {}
        out = {
            "seed_params": self.seed_params,
            "seed_flops": self.seed_flops,
            "final_params": self.graph.num_params(),
            "final_flops": count_flops(self.graph),
            "val_accuracy": last.get("val_accuracy"),
            "val_loss": last.get("val_loss"),
            "train_loss": last.get("train_loss"),
            "phases": len(self.metrics),
            "epochs": last.get("epochs", 0),
            "morphisms_applied": _count_applied(self.metrics),
            "redundant_channels": sum(last.get("redundant", {}).values()),
            "seconds": round(self.seconds, 2),
            "lam": self.config.lam,
            "resource": self.config.resource,
            "seed": self.config.seed,
        }
        if self.retrained is not None:
            out["retrain"] = self.retrained
        return out


def _count_applied(metrics: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for m in metrics:
        for k, v in m.get("applied", {}).items():
            total[k] += v
    return dict(total)


def phase_summary(m: Mapping[str, Any]) -> str:
    """One line for a phase's metrics record (what ``morphir grow`` prints).

    >>> phase_summary(result.metrics[0])
    'phase 1: train loss 0.4762, val loss 1.3016, val acc 0.532, 35,386 params, ...'
    """
    applied = ", ".join(f"{v} {k}" for k, v in sorted(m.get("applied", {}).items())) or "none"
    acc = m.get("val_accuracy")
    acc_text = f"val acc {acc:.3f}, " if acc is not None else ""
    return (f"phase {m['phase']}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, {acc_text}"
            f"{m['params']:,} params, {m['flops']:,} FLOPs; grew: {applied} ({m['seconds']:.1f} s)")


def retrain(
    result: GrowResult,
    train: Iterable[tuple[Any, Any]],
    val: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Reinitialise the grown architecture and train it from scratch for the run's number of epochs
    with the same optimizer and schedule (the paper's protocol); stores and returns its metrics.

    >>> morphir.retrain(result, train, val, F.cross_entropy)["val_accuracy"]
    """
    from tqdm.auto import tqdm

    cfg = result.config
    module = copy.deepcopy(result.graph.module).to(torch.device(device))
    reinitialise(module, seed_for(cfg.seed, 3))
    opt = sgd(module, cfg)
    epochs = result.metrics[-1]["epochs"] if result.metrics else 0
    start = time.perf_counter()
    train_loss = float("nan")
    for e in tqdm(range(epochs), desc="retrain", unit="epoch", leave=False, disable=not show_progress(progress)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg, e, epochs)
        torch.manual_seed(seed_for(cfg.seed, 4, e))
        train_loss = train_epoch(module, opt, train, loss_fn, where=f"retraining, epoch {e + 1}",
                                 device=torch.device(device))
    val_loss, val_acc = evaluate(module, val, loss_fn, device=torch.device(device))
    result.retrained = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc, "epochs": epochs,
                        "params": sum(p.numel() for p in module.parameters()),
                        "seconds": round(time.perf_counter() - start, 3)}
    return result.retrained

