"""Shared pieces of the growth tests: a small conv net, digits loaders, a crash-and-resume run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import morphir
from morphir.data import digits_tensors
from morphir.checkpoints import CHECKPOINT


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 10))


def loaders(n: int = 320, batch: int = 32):
    xt, yt, xv, yv = digits_tensors(seed=0)
    train = DataLoader(TensorDataset(xt[:n], yt[:n]), batch_size=batch, shuffle=True)
    val = DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=64)
    return train, val


def strip_timing(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records without their wall-clock fields."""
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in metrics]


def grow_vgg19_and_resume(method: morphir.Grower, tmp_path: Path) -> tuple[morphir.GrowResult, morphir.GrowResult]:
    """Grow the vgg19 seed on digits for 2 phases in ``tmp_path/a``, then resume from a copy of its run
    directory as a crash right after phase 1 leaves it; returns (uninterrupted, resumed)."""
    data = morphir.load_data("digits", seed=0, batch_size=64)

    def vgg() -> nn.Module:
        torch.manual_seed(0)
        return morphir.zoo.build("vgg19", (1, 8, 8), 10)

    run = dict(method=method, phases=2, phase_epochs=1, progress=False)
    phase1: dict[str, bytes] = {}

    def keep_phase1(record):  # called after each phase's checkpoint is written
        if record["phase"] == 1:
            phase1.update({name: (tmp_path / "a" / name).read_bytes() for name in (CHECKPOINT, "metrics.jsonl")})

    full = morphir.grow(vgg(), data.train, data.val, F.cross_entropy, run_dir=tmp_path / "a", on_phase=keep_phase1,
                        **run)
    # the run directory as a crash right after phase 1 leaves it (its checkpoint holds the growth step)
    snapshot = tmp_path / "b"
    assert torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["phase"] == 2
    snapshot.mkdir()
    for name in (CHECKPOINT, "metrics.jsonl"):
        (snapshot / name).write_bytes(phase1[name])
    assert torch.load(snapshot / CHECKPOINT, weights_only=True)["phase"] == 1
    resumed = morphir.grow(vgg(), data.train, data.val, F.cross_entropy, run_dir=snapshot, resume=True, **run)
    return full, resumed


def assert_same_run(a: morphir.GrowResult, b: morphir.GrowResult) -> None:
    """Same metrics (timings aside) and bit-identical weights."""
    assert strip_timing(a.metrics) == strip_timing(b.metrics)
    sa, sb = a.graph.module.state_dict(), b.graph.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
