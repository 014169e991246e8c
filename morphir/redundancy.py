"""Near-duplicate channels: how much of a grown width is new capacity.

A split leaves two copies of a channel, incoming weights w ± θ. Training separates them only as
far as their gradients differ, and those differ only where the copies' activations do, so copies
born close together stay close: the network is wider on paper while computing with the features
it had. This module counts, per channel group, the channels whose incoming weights (over all the
group's producers) point within a cosine ``threshold`` of another channel's. A batch norm after
the producers normalises away the copies' scale, so such a pair computes nearly one feature.

>>> redundant_channels(result.graph)
{'features.0.0': 2, 'features.1.0': 0, ...}
"""

from __future__ import annotations

import torch

from morphir.errors import MorphirError
from morphir.graph import MorphGraph

__all__ = ["redundant_channels"]


@torch.no_grad()
def redundant_channels(graph: MorphGraph, threshold: float = 0.95) -> dict[str, int]:
    """For each growable channel group, how many of its channels have another channel whose
    incoming weights (all producers, flattened; biases left out) have cosine similarity at least
    ``threshold`` with theirs. A freshly split pair counts 2; a group without producer weights, 0.

    >>> redundant_channels(g, threshold=0.99)["features.0.0"]
    0
    """
    if not -1.0 <= threshold <= 1.0:
        raise MorphirError(f"threshold is a cosine similarity, in [-1, 1]; got {threshold}")
    out: dict[str, int] = {}
    for grp in graph.groups:
        if not grp.growable:
            continue
        rows = [graph.submodule(p.module).weight.detach().reshape(grp.width, -1).float() for p in grp.producers]
        if not rows or grp.width < 2:
            out[grp.name] = 0
            continue
        w = torch.cat(rows, dim=1)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = w @ w.T
        cos.fill_diagonal_(-2.0)
        out[grp.name] = int((cos.max(dim=1).values >= threshold).sum())
    return out
