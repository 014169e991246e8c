"""Bundled data: scikit-learn's digits (1,797 8×8 images, 10 classes), split by a seed.

>>> train, val = digits_loaders(seed=0, batch_size=64)
>>> x, y = next(iter(train)); x.shape
torch.Size([64, 1, 8, 8])
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits_tensors", "digits_loaders"]


def digits_tensors(*, seed: int = 0, val_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: images scaled to [0, 1] as (N, 1, 8, 8) float32, labels int64.

    The split is a fixed permutation drawn from ``seed``.

    >>> xt, yt, xv, yv = digits_tensors(seed=0)
    >>> xt.shape, xv.shape
    (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]))
    """
    from sklearn.datasets import load_digits  # the only use of scikit-learn: its bundled data

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def digits_loaders(*, seed: int = 0, batch_size: int = 64, val_fraction: float = 0.2) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over digits; the train loader shuffles with a seeded generator.

    >>> train, val = digits_loaders(seed=1, batch_size=32)
    """
    xt, yt, xv, yv = digits_tensors(seed=seed, val_fraction=val_fraction)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(xv, yv), batch_size=batch_size)
    return train, val
