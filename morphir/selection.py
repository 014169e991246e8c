"""Selection: which scored candidates a growth step applies, and what they cost.

The λ rule (−ΔL > λ·ΔR, at most ``top_fraction`` of a group's positive candidates, one per
channel, never a group emptied) and growth to a budget (the best estimated ΔL per unit added,
until the step's share of a target size is spent); :func:`count_flops` measures that size.

>>> chosen = select(morphir.score(g, batches, F.cross_entropy), g, lam=1e-5)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from morphir.batches import eval_mode
from morphir.errors import MorphirError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate

__all__ = ["count_flops", "select"]

# -- measuring ------------------------------------------------------------------------------------
def count_flops(graph: MorphGraph) -> int:
    """FLOPs of one forward pass per sample (2 × multiply-accumulates), counted by torch's flop counter.

    >>> count_flops(g)
    """
    module = graph.module
    device = next(iter(module.parameters()), torch.zeros(())).device
    x = tuple(t[:1].to(device) if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in graph.example_inputs)
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*x)
    return int(counter.get_total_flops())


# -- selection ------------------------------------------------------------------------------------
def _cost(c: Candidate, resource: str) -> int:
    return c.delta_params if resource == "params" else c.delta_flops


def select(
    cands: Iterable[Candidate],
    graph: MorphGraph,
    *,
    lam: float,
    resource: str = "params",
    top_fraction: float = 0.3,
    confidence: float = 0.0,
    budget: float | None = None,
) -> list[Candidate]:
    """The scored candidates to apply: −ΔL > λ·ΔR, best first, at most ``top_fraction`` (rounded up)
    of each group's positive ones, one morphism per channel, never a group pruned to zero.

    The margin −ΔL − λ·ΔR ranks splits (ΔR > 0) and prunes (ΔR < 0) on one scale.

    With ``budget`` (the growth schedule's share of a target size, in ``resource`` units) the rule
    is another: the growing candidates (ΔR > 0) ranked by estimated ΔL per unit of ΔR, best first,
    one per channel, are taken while they fit in the budget; λ, the confidence margin and
    ``top_fraction`` do not apply.

    >>> chosen = select(morphir.score(g, batches, F.cross_entropy), g, lam=1e-5)
    >>> grown = select(cands, g, lam=0, budget=5_000)   # about 5,000 more parameters
    """
    if budget is not None:
        return _select_to_budget(cands, graph, resource, budget)
    positive: dict[str, dict[tuple[int | None, str | None], tuple[float, Candidate]]] = defaultdict(dict)
    for c in cands:
        if c.estimate is None or not math.isfinite(c.estimate):
            continue
        margin = -c.estimate - confidence * c.extra.get("stderr", 0.0) - lam * _cost(c, resource)
        if margin <= 0:
            continue
        slot = (c.site.index, c.site.variant)
        best = positive[c.site.anchor].get(slot)
        if best is None or margin > best[0]:
            positive[c.site.anchor][slot] = (margin, c)
    chosen: list[Candidate] = []
    for anchor, slots in positive.items():
        ranked = sorted(slots.values(), key=lambda mc: (-mc[0], mc[1].name, mc[1].site))
        keep = math.ceil(top_fraction * len(ranked))
        width = _group_width(graph, anchor)
        pruned = 0
        for _, c in ranked:
            if keep == 0:
                break
            if c.morphism.removes_channel:
                if width is not None and pruned + 1 >= width:
                    continue  # never prune a group to zero channels
                pruned += 1
            chosen.append(c)
            keep -= 1
    return chosen


def _select_to_budget(cands: Iterable[Candidate], graph: MorphGraph, resource: str, budget: float) -> list[Candidate]:
    best: dict[tuple[str, int | None], Candidate] = {}
    for c in cands:
        cost = _cost(c, resource)
        if cost <= 0 or c.estimate is None or not math.isfinite(c.estimate):
            continue
        slot = (c.site.anchor, c.site.index)
        if slot not in best or c.estimate / cost < best[slot].estimate / _cost(best[slot], resource):
            best[slot] = c
    ranked = sorted(best.values(), key=lambda c: (c.estimate / _cost(c, resource), c.name, c.site))
    counter = _GrowthCost(graph, resource)
    chosen, spent = [], 0.0
    for c in ranked:
        cost = counter.next_cost(c)
        if spent + cost > budget and spent + cost / 2 > budget:  # take the last one if it brings us closer
            continue
        counter.add(c)
        chosen.append(c)
        spent += cost
    return chosen


class _GrowthCost:
    """What one more channel costs, given the channels already chosen in the same rewrite: its own
    cost, plus where it meets the others' new weights (a layer that reads one grown group and writes
    another gains the corner of its new rows and new columns; a layer that reads and writes one
    group, the square of that group's new channels)."""

    def __init__(self, graph: MorphGraph, resource: str):
        self.graph, self.resource = graph, resource
        self.added: dict[str, int] = defaultdict(int)
        self.producer_of = {p.module: grp.name for grp in graph.groups for p in grp.producers}
        self._links: dict[str, list[tuple[str, float]]] = {}

    def _per_pair(self, consumer) -> float:
        w = self.graph.submodule(consumer.module).weight
        params = float(w[0, 0].numel() * consumer.segment.inner)
        if self.resource == "params":
            return params
        shape = self.graph.shape(consumer.node)
        positions = 1 if shape is None or len(shape) < 2 else int(torch.Size(shape[2:]).numel()) or 1
        if isinstance(self.graph.submodule(consumer.module), nn.Linear) and shape is not None:
            positions = int(torch.Size(shape[1:-1]).numel()) or 1
        return 2.0 * params * positions

    def links(self, group: str) -> list[tuple[str, float]]:
        """``(other group, cost per pair of new channels)`` for the layers where this group's new
        columns meet another group's new rows, in both directions."""
        if group not in self._links:
            out = []
            for grp in self.graph.groups:
                for c in grp.consumers:
                    writes = self.producer_of.get(c.module)
                    if writes is None or writes == grp.name:
                        continue  # a group's own corner is in its cost_of_adding
                    if grp.name == group:
                        out.append((writes, self._per_pair(c)))
                    elif writes == group:
                        out.append((grp.name, self._per_pair(c)))
            self._links[group] = out
        return self._links[group]

    def next_cost(self, c: Candidate) -> float:
        g = c.site.anchor
        grp = self.graph.group(g)
        k = self.added[g]
        own = grp.cost_of_adding(k + 1)[self.resource == "flops"] - grp.cost_of_adding(k)[self.resource == "flops"]
        return float(own) + sum(per * self.added[h] for h, per in self.links(g))

    def add(self, c: Candidate) -> None:
        self.added[c.site.anchor] += 1


def _group_width(graph: MorphGraph, anchor: str) -> int | None:
    try:
        return graph.group(anchor).width
    except MorphirError:
        return None

