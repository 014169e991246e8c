"""The growing step between two training phases: the grower decides, the engine rewrites and checks,
the optimizer state follows the parameters, and the step is recorded.

>>> grow_step(state, cfg, train, F.cross_entropy, grower, registry, record, k=0)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from morphir.batches import to_device
from morphir.checkpoints import RunState
from morphir.config import GrowConfig
from morphir.engine import rewrite
from morphir.growers import Grower, Growth, GrowthStep, batch_loss, log_entry
from morphir.morphism import Candidate, Registry
from morphir.optim_state import rebuild_optimizer
from morphir.scoring import LossFn
from morphir.selection import count_flops
from morphir.train import recalibrate_batch_norm, seed_for

__all__ = ["grow_step"]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def grow_step(state: RunState, cfg: GrowConfig, train: Iterable[tuple[Any, Any]], loss_fn: LossFn,
               grower: Grower, registry: Registry, record: dict[str, Any], k: int) -> None:
    """The growing step after phase ``k`` (0-based): batch-norm statistics re-estimated, the
    grower's decision (on the CPU, where the engine's probe batch and checks live), the rewrite,
    the optimizer state carried through it, and the step's record (applied morphisms, chosen
    channels, loss jump, seconds, FLOPs); ``state`` then holds the grown graph.

    >>> grow_step(state, cfg, train, F.cross_entropy, grower, registry, record, k=0)
    """
    started = time.perf_counter()
    graph = state.graph
    torch.manual_seed(seed_for(cfg.seed, 2, k))

    # one fixed set of batches for recalibration and the grower's decision, and as many further
    # batches held out, for what must not be fitted on the first (checks, line searches); with
    # score_batches None, one epoch split in two
    n = cfg.score_batches
    taken = list(iter(train)) if n is None else list(itertools.islice(iter(train), 2 * n))
    cut = (len(taken) + 1) // 2 if (n is None or len(taken) < 2 * n) else n
    cpu = [(to_device(x, _CPU), to_device(y, _CPU)) for x, y in taken]
    batches, held = cpu[:cut], (cpu[cut:] or None)

    # the growing step runs on the CPU, where the engine's probe batch and checks live; the
    # module goes back to its device afterwards (parameters keep their identity, so the optimizer
    # state, which stays on the device, is still found by name)
    device = next(iter(graph.module.parameters()), torch.zeros(())).device
    graph.module.cpu()
    try:
        if cfg.recalibrate:
            recalibrate_batch_norm(graph.module, batches)
        budget, resource = None, cfg.resource
        if cfg.target is not None:
            resource = cfg.target[0]
            size = graph.num_params() if resource == "params" else count_flops(graph)
            budget = cfg.step_budget(k, size)
        step = GrowthStep(graph, batches, held, train, loss_fn, cfg, registry, k, seed_for(cfg.seed, 1, k),
                          budget=budget, budget_resource=resource)
        # under a FLOPs budget the step's own operations count against it (torch's flop counter
        # slows the step about 2.5×, so it only runs then)
        counting = cfg.budget_flops is not None or cfg.count_growth_flops
        counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
        with counter:
            growth = grower.grow(step) if budget != 0 else Growth(info={"target_reached": True})
        growth_flops = float(counter.get_total_flops()) if counting else None
        if growth_flops is not None and cfg.budget_flops is not None and state.flops + growth_flops >= cfg.budget_flops:
            # the step spent what was left of the budget: nothing could train what it grew, so the
            # run ends with the network the phase trained (the step's cost is still charged)
            log.info("growth step %d spent the rest of the FLOPs budget; its growth is not applied", k)
            growth = Growth(info={"budget_spent_by_growth": True})
            state.done = True
        before = batch_loss(graph, cpu, loss_fn)
        thetas: dict[Candidate, torch.Tensor] = {}
        if growth.result is None and growth.chosen:
            # θ: the grower's, else what scoring left on the candidate, else the morphism's default
            thetas = dict(growth.thetas) if growth.thetas is not None else {
                c: c.theta for c in growth.chosen if c.theta is not None}
            result = rewrite(graph, growth.chosen, thetas)
        else:
            result = growth.result
        after = batch_loss(result.graph, cpu, loss_fn) if result is not None else before
    finally:
        graph.module.to(device)
    applied: dict[str, int] = defaultdict(int)
    where: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for c in growth.chosen:
        applied[c.name] += 1
        if c.site.index is not None:
            where[c.name][c.site.anchor].append(c.site.index)
    record["applied"] = dict(applied)
    record["chosen"] = {name: {g: sorted(ix) for g, ix in groups.items()} for name, groups in where.items()}
    record["estimated_gain"] = growth.estimated_gain
    record["loss_jump"] = after - before
    record["growth_flops"] = growth_flops
    record["growth_seconds"] = round(time.perf_counter() - started, 3)
    record.update(growth.info)
    state.flops += record["growth_flops"] or 0.0
    if result is None:
        state.log.append([])
        return
    result.graph.module.to(device)
    state.opt = rebuild_optimizer(state.opt, graph.module, result.graph.module, result.param_edits)
    state.graph = result.graph
    if growth.log is not None:
        state.log.append(growth.log)
    else:
        state.log.append([log_entry(c, thetas.get(c)) for c in growth.chosen])
