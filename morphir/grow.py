"""The growth loop (Algorithm 1 of Lawton, Galstyan, Ver Steeg, arXiv 2411.05855).

Each phase trains the weights with the architecture frozen (SGD, Nesterov momentum, a cosine
learning rate over the whole run), then, except after the last phase, grows: with the weights
frozen the scoring pass learns θ and estimates ΔL for every candidate, and a morphism is applied
when −ΔL > λ·ΔR (ΔR: its change of parameters or FLOPs). Splits and prunes compete on that one
scale; at most the top ``top_fraction`` of the positive morphisms of a group are applied per
phase, and a group is never pruned to zero. Every rewrite goes through the engine's preservation
check, and the optimizer's state follows every parameter through it.

>>> result = morphir.grow(model, train, val, F.cross_entropy, lam=1e-5, phases=4, phase_epochs=3)
>>> result.graph.num_params(), result.metrics[-1]["val_accuracy"]

With ``run_dir`` a checkpoint is written atomically after every phase (and before the first),
with ``metrics.jsonl``; ``resume=True`` continues from it and ends with the same architecture and
metrics as an uninterrupted run with the same seed (every epoch's shuffle and every scoring pass
is seeded from the seed and its position in the run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from morphir import files
from morphir.engine import default_registry, rewrite
from morphir.errors import CheckpointError, MorphirError, TrainingError
from morphir.graph import MorphGraph
from morphir.tracing import trace
from morphir.growers import Grower, Growth, GrowthStep, batch_loss, log_entry
from morphir.morphism import Candidate, Registry
from morphir.optim_state import rebuild_optimizer
from morphir.redundancy import redundant_channels
from morphir.scoring import LossFn, ScoreConfig
from morphir.train import evaluate, to_device, train_epoch

__all__ = [
    "GrowConfig",
    "GrowResult",
    "grow",
    "select",
    "count_flops",
    "retrain",
    "recalibrate_batch_norm",
    "phase_summary",
    "CHECKPOINT",
    "METRICS",
]

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
_FORMAT = 3  # 3: with a checksum of the content; 2 (no checksum) is still read


@dataclass(frozen=True)
class GrowConfig:
    """Everything that decides a growth run (checkpoints refuse to resume under a different one).

    ``lam``: λ of the criterion −ΔL > λ·ΔR (0, the default: every morphism predicted to lower the
    loss qualifies; raise it to favour smaller networks); ``resource``: ΔR counts ``"params"`` or ``"flops"``
    (per sample). ``phases``: training phases (a growth step follows each but the last);
    ``phase_epochs``: epochs per phase; ``final_epochs``: epochs of the last phase, which trains the
    final architecture (None: ``phase_epochs``). ``top_fraction``: at most this share (rounded up) of a
    group's positive morphisms applied per phase. ``lr``, ``momentum``, ``weight_decay``,
    ``nesterov``: SGD; the learning rate follows a cosine from ``lr``. ``schedule``: ``"restart"``
    (the default) starts the cosine again from ``lr`` after every growth step that changed the
    network, over the epochs (or the share of ``budget_flops``) left; ``"cosine"`` is one cosine
    over the whole run. A split's copies start next to each other, in the basin the seed trained
    into, and a learning rate already decayed cannot take them apart: measured (docs/tasks.md),
    the restart lowers the grown net's val loss by 0.017 on ``teacher`` and 0.12 on
    ``digits_augmented`` and leaves ``clusters`` level.
    ``score_batches``: training batches the scoring pass learns θ on (None: a whole epoch);
    ``score``: the scoring pass's own knobs. ``theta``: ``"learned"`` (the method) or ``"random"``
    (θ stays at its random start: Net2Net-style noise, the ablation). ``recalibrate``: before
    scoring, re-estimate batch-norm statistics on the scoring batches, so the function scored (in
    eval mode) is the one the weights compute, not running averages of earlier, noisier weights.
    ``confidence``: a morphism qualifies only when −ΔL − confidence × (standard error of its
    estimate over the samples) > λ·ΔR (0: the paper's rule).
    ``method``: the grower (``gn``, ``net2net``, ``random``, ``firefly``, ``gradmax``, ``s2d``,
    ``mixture``; see :mod:`morphir.passes`). ``when``: grow at the end of every phase of
    ``phase_epochs`` epochs (``"phases"``), or when the training loss has not improved by
    ``plateau_delta`` (relative) for ``patience`` epochs (``"plateau"``; at most ``phases − 1``
    growth steps). ``budget_flops``: stop when training (3 × forward FLOPs per sample per epoch)
    plus the growth steps' own FLOPs reach this many; the learning rate then follows the cosine in
    the share of the budget spent, and the last phase lasts until the budget is spent. A growth
    step that spends the rest of the budget is not applied (nothing could train what it grew): the
    run ends with the network the last phase trained.
    ``target_params`` / ``target_flops``: grow to this size (parameters, or FLOPs per sample) by
    the growth step after phase ``target_phase`` (None: half the phases, rounded up): each step adds
    its share of what is left, split evenly over the steps until then, and the grower chooses where
    (for ``gn``: the candidates with the best estimated loss change per unit added, one per channel,
    whatever λ says). ``target_factor``: the same, relative to the seed: grow to this many times the
    seed's parameters (``resource="params"``) or FLOPs per sample (``"flops"``); an absolute target
    takes precedence. The default, 4 × the seed by the middle growth step, is the measured choice
    (docs/tasks.md): the λ rule alone adds width too little and too late. ``target_factor=None``
    with no absolute target leaves how much to grow to the λ rule (``lam``, ``top_fraction``,
    ``confidence``), the paper's method. ``count_growth_flops``: count each growth step's FLOPs (``growth_flops`` in
    its record, and in ``train_flops``) without a budget too (torch's flop counter slows a step
    about 2.5×). ``seed``: every shuffle, initial θ and scoring pass derives from it.
    """

    lam: float = 0.0
    resource: Literal["params", "flops"] = "params"
    phases: int = 5
    phase_epochs: int = 20
    final_epochs: int | None = None
    top_fraction: float = 0.3
    morphisms: tuple[str, ...] = ("split", "prune")
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: Literal["restart", "cosine"] = "restart"
    score_batches: int | None = 8
    score: ScoreConfig = field(default_factory=ScoreConfig)
    theta: Literal["learned", "random"] = "learned"
    recalibrate: bool = True
    confidence: float = 0.0
    method: str = "gn"
    when: Literal["phases", "plateau"] = "phases"
    patience: int = 3
    plateau_delta: float = 0.01
    budget_flops: float | None = None
    target_params: int | None = None
    target_flops: float | None = None
    target_phase: int | None = None
    target_factor: float | None = 4.0
    count_growth_flops: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def integer(name: str, low: int, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise MorphirError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name: str, value: Any, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > low if strict else value >= low) and (high is None or value <= high)
            if not ok:
                bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                raise MorphirError(f"{name} must be a finite number {bound}, got {value!r}")

        if self.when not in ("phases", "plateau"):
            raise MorphirError(f"when must be 'phases' or 'plateau', got {self.when!r}")
        if self.resource not in ("params", "flops"):
            raise MorphirError(f"resource must be 'params' or 'flops', got {self.resource!r}")
        if self.schedule not in ("restart", "cosine"):
            raise MorphirError(f"schedule must be 'restart' or 'cosine', got {self.schedule!r}")
        if self.theta not in ("learned", "random"):
            raise MorphirError(f"theta must be 'learned' or 'random', got {self.theta!r}")
        integer("phases", 1, self.phases)
        integer("phase_epochs", 1, self.phase_epochs)
        if self.final_epochs is not None:
            integer("final_epochs", 1, self.final_epochs)
        integer("patience", 1, self.patience)
        integer("seed", 0, self.seed)
        if self.score_batches is not None:
            integer("score_batches", 1, self.score_batches)
        number("plateau_delta", self.plateau_delta, high=0.999999)
        if self.budget_flops is not None:
            number("budget_flops", self.budget_flops, strict=True)
        if self.target_params is not None:
            integer("target_params", 1, self.target_params)
        if self.target_flops is not None:
            number("target_flops", self.target_flops, strict=True)
        if self.target_params is not None and self.target_flops is not None:
            raise MorphirError("give target_params or target_flops, not both")
        if self.target_factor is not None:
            number("target_factor", self.target_factor, low=1.0, strict=True)
        if self.target_phase is not None:
            integer("target_phase", 1, self.target_phase)
            if self.target_phase > max(self.phases - 1, 1):
                raise MorphirError(f"target_phase must be at most the last growth step ({self.phases - 1}), got "
                                   f"{self.target_phase}")
        number("top_fraction", self.top_fraction, strict=True, high=1.0)
        number("lam", self.lam)
        number("confidence", self.confidence)
        number("lr", self.lr, strict=True)
        number("momentum", self.momentum, high=0.999999)
        number("weight_decay", self.weight_decay)
        if not isinstance(self.morphisms, tuple) or not all(isinstance(m, str) for m in self.morphisms):
            raise MorphirError(f"morphisms must be a tuple of morphism names, got {self.morphisms!r}")

    @property
    def target(self) -> tuple[str, float] | None:
        """``(resource, size)`` the run grows to, or None (the λ rule decides how much)."""
        if self.target_params is not None:
            return ("params", float(self.target_params))
        if self.target_flops is not None:
            return ("flops", float(self.target_flops))
        return None

    def resolved(self, seed_params: int, seed_flops: float) -> GrowConfig:
        """This config with ``target_factor`` turned into an absolute target for a seed of that size
        (unchanged without a factor, or with an absolute target already).

        >>> GrowConfig(target_factor=4).resolved(274, 266).target_params
        1096
        """
        if self.target_factor is None or self.target is not None:
            return self
        if self.resource == "flops":
            return dataclasses.replace(self, target_flops=self.target_factor * float(seed_flops))
        return dataclasses.replace(self, target_params=max(1, round(self.target_factor * seed_params)))

    def step_budget(self, phase: int, size: float) -> float:
        """How much the growth step after ``phase`` adds toward the target from ``size``: what is left,
        split evenly over the steps up to the target phase (all of it past that phase; 0 at the target).

        >>> GrowConfig(phases=5, target_params=1000, target_phase=2).step_budget(1, 400)
        300.0
        """
        target = self.target
        if target is None:
            raise MorphirError("step_budget needs target_params or target_flops")
        last = self.target_phase if self.target_phase is not None else math.ceil((self.phases - 1) / 2) or 1
        if size >= target[1]:
            return 0.0
        return (target[1] - size) / max(last - phase + 1, 1)  # past the target phase: catch up at once

    @property
    def epochs(self) -> int:
        """Total training epochs of the run (without a FLOPs budget)."""
        last = self.phase_epochs if self.final_epochs is None else self.final_epochs
        return (self.phases - 1) * self.phase_epochs + last

    def as_dict(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        out = dataclasses.asdict(self)
        out["morphisms"] = list(self.morphisms)
        return out


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


# -- measuring ------------------------------------------------------------------------------------
def count_flops(graph: MorphGraph) -> int:
    """FLOPs of one forward pass per sample (2 × multiply-accumulates), counted by torch's flop counter.

    >>> count_flops(g)
    """
    module = graph.module
    device = next(iter(module.parameters()), torch.zeros(())).device
    x = tuple(t[:1].to(device) if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in graph.example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*x)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def _widths(graph: MorphGraph) -> dict[str, int]:
    return {grp.name: grp.width for grp in graph.groups if grp.growable}


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
            if c.name == "prune":
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


# -- training -------------------------------------------------------------------------------------
def _seed_for(seed: int, *where: int) -> int:
    value = seed
    for w in where:
        value = (value * 1_000_003 + w + 1) % (2**62)
    return value


def _optimizer(module: nn.Module, cfg: GrowConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _lr_at(cfg: GrowConfig, epoch: int, total: int) -> float:
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(total, 1)))


# -- checkpoints ----------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """:func:`morphir.files.atomic_write` into a run directory, created if missing.

    >>> atomic_write(Path("run/summary.json"), lambda f: f.write(text), binary=False)
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, write, binary=binary)


def _state_by_name(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    return {name: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            for name, p in module.named_parameters() if p in opt.state}


def _load_state(module: nn.Module, opt: torch.optim.Optimizer, state: Mapping[str, Mapping[str, Any]]) -> None:
    params = dict(module.named_parameters())
    for name, st in state.items():
        if name in params:
            device = params[name].device
            opt.state[params[name]] = {k: v.to(device) if isinstance(v, torch.Tensor) and v.dim() else v
                                       for k, v in st.items()}


def _write_metrics(run_dir: Path, metrics: Sequence[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(run_dir / METRICS, lambda f: f.write(text), binary=False)


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class _State:
    graph: MorphGraph
    opt: torch.optim.Optimizer
    phase: int  # phases finished
    metrics: list[dict[str, Any]]
    log: list[list[dict[str, Any]]]
    seconds: float
    epoch: int = 0  # epochs finished
    flops: float = 0.0  # training + growth FLOPs spent
    done: bool = False  # the run ended (epochs or budget spent)
    grower_settings: dict[str, Any] = field(default_factory=dict)


def _checkpoint(state: _State, cfg: GrowConfig, identity: str) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "identity": identity,
        "config": json.dumps({**cfg.as_dict(), "grower": state.grower_settings}, sort_keys=True),
        "phase": state.phase,
        "epoch": state.epoch,
        "flops": state.flops,
        "done": state.done,
        "log": state.log,
        "model_state": {k: v.detach().clone() for k, v in state.graph.module.state_dict().items()},
        "optimizer_state": _state_by_name(state.graph.module, state.opt),
        "metrics": json.dumps(state.metrics),
        "seconds": state.seconds,
    }


def _digest(value: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes, containers in a canonical
    order, other values by ``repr``; the same content always gives the same digest."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode() + b";")

    feed(value)
    return h.hexdigest()


def _save_checkpoint(run_dir: Path, ckpt: Mapping[str, Any]) -> None:
    path = run_dir / CHECKPOINT
    buffer = io.BytesIO()  # serialise first: a failing file write is then a plain OSError
    torch.save({**ckpt, "checksum": _digest(dict(ckpt))}, buffer)
    data = buffer.getvalue()
    for target, write in ((path, lambda f: f.write(data)),
                          (run_dir / METRICS, None)):
        try:
            if write is None:
                _write_metrics(run_dir, json.loads(ckpt["metrics"]))
            else:
                atomic_write(target, write)
        except OSError as exc:
            if target == path:
                kept = ("the previous checkpoint is kept: free space and continue with --resume" if path.exists()
                        else "no checkpoint was written yet: free space and start the run again")
            else:
                kept = "the checkpoint itself was written: free space and continue with --resume"
            raise CheckpointError(f"could not write {target} after phase {ckpt['phase']} "
                                  f"({exc.strerror or exc}); {kept}") from exc


def _read_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); "
                              "it may be corrupt: start a fresh run in another directory") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (2, _FORMAT):
        raise CheckpointError(f"{path}: not a morphir growth checkpoint (format 2 or {_FORMAT}); start a fresh run "
                              "in another directory")
    if ckpt["format"] == _FORMAT:
        content = {k: v for k, v in ckpt.items() if k != "checksum"}
        if ckpt.get("checksum") != _digest(content):
            raise CheckpointError(f"{path}: the checkpoint's content does not match its checksum: it was changed or "
                                  "damaged after it was written. Restore it from a copy, or start a fresh run in "
                                  "another directory")
    else:
        log.warning("%s was written by an older morphir without a checksum: its integrity cannot be verified", path)
    _validate(ckpt, path)
    return ckpt


def _validate(ckpt: Mapping[str, Any], path: Path) -> None:
    """Every field a resume reads, with its type and range; CheckpointError naming the first that is wrong."""

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} {what}; the checkpoint is not one morphir wrote (or it "
                               "was edited): start a fresh run in another directory")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    for key, ok, what in (
        ("identity", lambda v: isinstance(v, str), "must be a string"),
        ("config", lambda v: isinstance(v, str), "must be a JSON string"),
        ("phase", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0"),
        ("epoch", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0"),
        ("flops", number, "must be a finite number >= 0"),
        ("seconds", number, "must be a finite number >= 0"),
        ("done", lambda v: isinstance(v, bool), "must be true or false"),
        ("log", lambda v: isinstance(v, list) and all(isinstance(e, list) and all(isinstance(d, dict) for d in e)
                                                      for e in v), "must be a list of lists of growth entries"),
        ("model_state", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                              for k, t in v.items()), "must map names to tensors"),
        ("optimizer_state", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, dict)
                                                                  for k, t in v.items()),
         "must map parameter names to optimizer states"),
        ("metrics", lambda v: isinstance(v, str), "must be a JSON string"),
    ):
        if key not in ckpt:
            raise bad(key, "is missing")
        if not ok(ckpt[key]):
            raise bad(key, f"{what}, not {type(ckpt[key]).__name__} {str(ckpt[key])[:40]!r}")
    for key, kind in (("config", dict), ("metrics", list)):
        try:
            value = json.loads(ckpt[key])
        except json.JSONDecodeError as exc:
            raise bad(key, f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(value, kind):
            raise bad(key, f"must hold a JSON {kind.__name__}")
    metrics = json.loads(ckpt["metrics"])
    if len(metrics) != ckpt["phase"] or not all(isinstance(m, dict) for m in metrics):
        raise bad("metrics", f"holds {len(metrics)} records for {ckpt['phase']} finished phases")
    if len(ckpt["log"]) > ckpt["phase"]:
        raise bad("log", f"holds {len(ckpt['log'])} growth steps for {ckpt['phase']} finished phases")


def _replay(graph: MorphGraph, log_: Sequence[Sequence[Mapping[str, Any]]], grower: Grower,
            registry: Registry) -> MorphGraph:
    """Re-apply the logged growth steps (structure only: weights are loaded afterwards)."""
    for k, entries in enumerate(log_):
        try:
            graph = grower.replay(graph, entries, registry)
        except CheckpointError as exc:
            raise CheckpointError(f"growth step {k + 1}: {exc}") from None
        except (MorphirError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"growth step {k + 1} of the checkpoint cannot be replayed ({type(exc).__name__}: "
                                  f"{exc}); it is not this run's checkpoint: start a fresh run in another "
                                  "directory") from None
    return graph


def _align_biases(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Whether a prune folded a bias into a layer without one depends on the weights of that moment,
    so a replay on other weights may differ there: give each layer the bias the checkpoint has."""
    current = dict(module.named_parameters())
    for key in set(state) ^ set(current):
        owner, _, attr = key.rpartition(".")
        if attr != "bias":
            continue
        layer = module.get_submodule(owner)
        if key in state and getattr(layer, "bias", "absent") is None:
            layer.bias = nn.Parameter(torch.zeros_like(state[key]))
        elif key not in state and isinstance(getattr(layer, "bias", None), nn.Parameter):
            layer.bias = None


def _restore(seed_graph: MorphGraph, ckpt: Mapping[str, Any], cfg: GrowConfig, grower: Grower, registry: Registry,
             device: torch.device) -> _State:
    graph = _replay(seed_graph, ckpt["log"], grower, registry)
    module = graph.module
    _align_biases(module, ckpt["model_state"])
    expected = {k: tuple(v.shape) for k, v in ckpt["model_state"].items()}
    actual = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))[:4]
        raise CheckpointError("the checkpoint's weights do not fit the replayed architecture (e.g. "
                              + ", ".join(f"{k} {shape}" for k, shape in diff) + "): it was made from a different model")
    try:
        module.load_state_dict(ckpt["model_state"])
        module.to(device)
        opt = _optimizer(module, cfg)
        _load_state(module, opt, ckpt["optimizer_state"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's weights or optimizer state cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); start a fresh run in another directory") from None
    return _State(graph, opt, int(ckpt["phase"]), json.loads(ckpt["metrics"]), list(ckpt["log"]),
                  float(ckpt["seconds"]), int(ckpt["epoch"]), float(ckpt["flops"]), bool(ckpt["done"]))


def resolve_grower(method: str | Grower) -> Grower:
    """The grower called ``method`` (a :class:`Grower` instance is returned as is).

    >>> resolve_grower("net2net")
    <grower net2net>
    """
    if isinstance(method, Grower):
        return method
    from morphir.passes import builtin_growers

    growers = builtin_growers()
    if method not in growers:
        raise MorphirError(f"unknown growth method {method!r}; built in: {', '.join(growers)}")
    return growers[method]


def _progress(enabled: bool | None) -> bool:
    return sys.stderr.isatty() if enabled is None else enabled


# settings added after checkpoints were first written, with the value that reproduces the code before
_BEFORE_SETTING = {"target_params": None, "target_flops": None, "target_phase": None, "target_factor": None,
                   "count_growth_flops": False, "schedule": "cosine"}
_BEFORE_GROWER_SETTING = {"init": "random"}  # the gn grower's, before its θ started at s2d's directions


def grow(
    model: nn.Module | MorphGraph,
    train: Iterable[tuple[Any, Any]],
    val: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    config: GrowConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    identity: str = "",
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    on_phase: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> GrowResult:
    """Grow ``model`` while it trains (Algorithm 1); returns a :class:`GrowResult`.

    ``train``/``val``: re-iterable ``(x, y)`` batches (a DataLoader; its shuffle is seeded per
    epoch); ``loss_fn(output, y)``: a mean loss. Options are :class:`GrowConfig` fields, given as
    ``config`` or keywords (``lam``, ``resource``, ``phases``, ``phase_epochs``, ``top_fraction``,
    ...). ``run_dir``: write ``checkpoint.pt`` and ``metrics.jsonl`` there after every phase;
    ``resume``: continue from that checkpoint (``identity`` names the model, so a checkpoint of
    another model is refused). ``on_phase`` is called with each phase's metrics record.

    A NaN or infinite loss stops the run with :class:`TrainingError`; the checkpoint of the last
    finished phase is left as it was.

    >>> res = morphir.grow(model, train, val, F.cross_entropy, lam=1e-5, phases=3, phase_epochs=2, run_dir="run")
    """
    from tqdm.auto import tqdm

    method = options.pop("method", None)
    if isinstance(method, Grower):
        options["method"] = method.name
    elif method is not None:
        options["method"] = method
    known = {f.name for f in dataclasses.fields(GrowConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise MorphirError(f"unknown growth option(s) {', '.join(unknown)}; the options are GrowConfig's fields: "
                           f"{', '.join(sorted(known))}")
    if not callable(loss_fn):
        raise MorphirError(f"loss_fn must be a callable (output, y) -> mean loss, got {type(loss_fn).__name__}")
    cfg = dataclasses.replace(config or GrowConfig(), **options)
    grower = resolve_grower(method if isinstance(method, Grower) else cfg.method)
    registry = registry or default_registry()
    for m in grower.morphisms():
        if m.name not in registry:
            registry = Registry([*registry, m])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MorphirError(f"{device!r} is not a device; use 'cpu' or 'cuda' (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MorphirError(f"device {device!r}: CUDA is not available on this machine; use 'cpu'")
    if isinstance(model, MorphGraph):
        seed_graph = model.copy()
    else:
        if not isinstance(model, nn.Module):
            raise MorphirError(f"grow expects a torch.nn.Module or a MorphGraph, got {type(model).__name__}")
        from morphir.data import first_batch

        x0, _ = first_batch(train, "the training data")
        seed_graph = trace(copy.deepcopy(model), tuple(t[:1] for t in (x0 if isinstance(x0, tuple) else (x0,))))
    if seed_graph.num_params() == 0:
        raise MorphirError(f"{type(seed_graph.module).__name__} has no parameters: there is nothing to train or grow")
    seed_graph = grower.prepare(seed_graph, cfg)
    seed_params, seed_flops = seed_graph.num_params(), count_flops(seed_graph)
    cfg = cfg.resolved(seed_params, seed_flops)
    out_dir = Path(run_dir) if run_dir is not None else None
    settings = {**cfg.as_dict(), "grower": grower.settings()}  # a resume needs the same of both
    config_json = json.dumps(settings, sort_keys=True)

    if resume:
        if out_dir is None:
            raise CheckpointError("resume needs the run directory of the run to continue")
        ckpt = _read_checkpoint(out_dir)
        if ckpt["identity"] != identity:
            raise CheckpointError(f"{out_dir / CHECKPOINT} belongs to {ckpt['identity']!r}, not {identity!r}")
        if ckpt["config"] != config_json:
            # a setting added since the checkpoint was written counts as what the code did before it
            defaults = json.loads(json.dumps({**GrowConfig().as_dict(), **_BEFORE_SETTING}))
            old = {**defaults, **json.loads(ckpt["config"])}
            new = json.loads(config_json)
            if isinstance(old.get("grower"), dict) and isinstance(new.get("grower"), dict):
                old["grower"] = {**{k: v for k, v in _BEFORE_GROWER_SETTING.items() if k in new["grower"]},
                                 **old["grower"]}
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k))
            if diff:
                hint = ""
                if old.get("target_factor") is None and new.get("target_factor") is not None and \
                        old.get("target_params") is None and old.get("target_flops") is None:
                    hint = " (a run that grew by the λ rule resumes with --target-factor none, or target_factor=None)"
                if (old.get("grower") or {}).get("init") != (new.get("grower") or {}).get("init"):
                    hint += (f" (its grower started θ with init={old['grower'].get('init')!r}: resume with "
                             f"method=GaussNewton(init={old['grower'].get('init')!r}))")
                raise CheckpointError(f"{out_dir / CHECKPOINT} was made with other settings ({diff}); resume with "
                                      f"the same ones{hint}")
        if ckpt["phase"] > cfg.phases:
            raise CheckpointError(f"{out_dir / CHECKPOINT}: field 'phase' is {ckpt['phase']}, beyond the run's "
                                  f"{cfg.phases} phases; the checkpoint is not this run's")
        state = _restore(seed_graph, ckpt, cfg, grower, registry, dev)
        state.grower_settings = grower.settings()
        log.info("resuming after phase %d of %d from %s", state.phase, cfg.phases, out_dir)
    else:
        seed_graph.module.to(dev)
        state = _State(seed_graph, _optimizer(seed_graph.module, cfg), 0, [], [], 0.0,
                       grower_settings=grower.settings())
        if out_dir is not None:
            _save_checkpoint(out_dir, _checkpoint(state, cfg, identity))

    show = _progress(progress)
    phases_bar = tqdm(total=cfg.phases, initial=state.phase, desc="phases", unit="phase", disable=not show,
                      dynamic_ncols=True)
    n_train = _num_samples(train)
    try:
        while not state.done and state.phase < cfg.phases:
            _run_phase(state, cfg, train, val, loss_fn, grower, registry, dev, show, out_dir, n_train)
            if out_dir is not None:
                _save_checkpoint(out_dir, _checkpoint(state, cfg, identity))
            phases_bar.update(1)
            record = state.metrics[-1]
            log.info(phase_summary(record))
            if on_phase is not None:
                on_phase(record)
    finally:
        phases_bar.close()
    state.graph.module.eval()
    return GrowResult(state.graph, state.metrics, state.log, seed_params, seed_flops, state.seconds, cfg)


def _num_samples(batches: Iterable[tuple[Any, Any]]) -> int:
    """Samples in one pass over ``batches`` (from the dataset when it has a length, else counted)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    total = 0
    for x, _ in batches:
        first = x[0] if isinstance(x, tuple) else x
        total += first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1
    return total


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


def _restart_point(state: _State, cfg: GrowConfig) -> tuple[int, float]:
    """Epochs and FLOPs spent when the cosine last started: at the last growth step that changed the
    network with ``schedule="restart"`` (read from the metrics, so a resumed run finds it too), else 0."""
    if cfg.schedule == "restart":
        for m in reversed(state.metrics):
            if m.get("applied"):
                return int(m["epochs"]), float(m["train_flops"])
    return 0, 0.0


def _lr_now(state: _State, cfg: GrowConfig) -> float:
    epoch0, flops0 = _restart_point(state, cfg)
    if cfg.budget_flops is not None:  # the cosine in the share of the compute budget spent
        left = cfg.budget_flops - flops0
        share = (state.flops - flops0) / left if left > 0 else 1.0
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(max(share, 0.0), 1.0)))
    return _lr_at(cfg, state.epoch - epoch0, cfg.epochs - epoch0)


def _run_phase(state: _State, cfg: GrowConfig, train: Iterable[tuple[Any, Any]], val: Iterable[tuple[Any, Any]],
               loss_fn: LossFn, grower: Grower, registry: Registry, device: torch.device, show: bool,
               out_dir: Path | None, n_train: int) -> None:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    k = state.phase + 1
    module = state.graph.module
    train_loss = float("nan")
    first_epoch = state.epoch
    first_lr = _lr_now(state, cfg)
    last = k == cfg.phases  # no growth step after the last phase
    epoch_flops = 3.0 * count_flops(state.graph) * n_train  # forward + backward ≈ 3 forwards
    where_ckpt = f"; the checkpoint after phase {state.phase} in {out_dir} is intact" if out_dir else ""
    best, since = math.inf, 0
    losses: list[float] = []
    bar = tqdm(desc=f"phase {k} epochs", unit="epoch", leave=False, disable=not show, dynamic_ncols=True,
               total=None if (cfg.when == "plateau" or cfg.budget_flops) else
               (cfg.epochs - first_epoch if last else cfg.phase_epochs))
    try:
        while True:
            e = state.epoch
            for group in state.opt.param_groups:
                group["lr"] = _lr_now(state, cfg)
            torch.manual_seed(_seed_for(cfg.seed, 0, e))
            try:
                train_loss = train_epoch(module, state.opt, train, loss_fn, where=f"phase {k}, epoch {e + 1}",
                                         device=device)
            except TrainingError as exc:
                raise TrainingError(f"{exc}; the run stopped{where_ckpt}. Lower the learning rate (--lr) or check "
                                    "the data, then resume") from None
            state.epoch += 1
            state.flops += epoch_flops
            losses.append(train_loss)
            bar.update(1)
            # when does the phase (and maybe the run) end?
            if cfg.budget_flops is not None:
                if state.flops >= cfg.budget_flops:
                    state.done = True
                    break
            elif state.epoch >= cfg.epochs:
                state.done = True
                break
            if last:
                continue
            if cfg.when == "phases":
                if state.epoch - first_epoch >= cfg.phase_epochs:
                    break
            else:
                if train_loss < best * (1 - cfg.plateau_delta):
                    best, since = train_loss, 0
                else:
                    since += 1
                if since >= cfg.patience:
                    break
    finally:
        bar.close()
    val_loss, val_acc = evaluate(module, val, loss_fn, device=device)
    if not math.isfinite(val_loss):
        raise TrainingError(f"the validation loss became {val_loss} in phase {k}; the run stopped{where_ckpt}")
    record: dict[str, Any] = {
        "phase": k,
        "epochs": state.epoch,
        "train_loss": train_loss,
        "epoch_losses": losses,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": first_lr,
        "params": state.graph.num_params(),
        "flops": count_flops(state.graph),
        "widths": _widths(state.graph),
        "redundant": redundant_channels(state.graph),
        "applied": {},
        "chosen": {},
    }
    if not last and not state.done:
        try:
            _grow_step(state, cfg, train, loss_fn, grower, registry, record, k)
        except TrainingError as exc:
            raise TrainingError(f"growth after phase {k} failed: {exc}; the run stopped{where_ckpt}") from None
    record["train_flops"] = state.flops
    record["seconds"] = round(time.perf_counter() - start, 3)
    state.seconds += record["seconds"]
    state.metrics.append(record)
    state.phase = k


def _grow_step(state: _State, cfg: GrowConfig, train: Iterable[tuple[Any, Any]], loss_fn: LossFn,
               grower: Grower, registry: Registry, record: dict[str, Any], k: int) -> None:
    started = time.perf_counter()
    graph = state.graph
    torch.manual_seed(_seed_for(cfg.seed, 2, k))

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
        step = GrowthStep(graph, batches, held, train, loss_fn, cfg, registry, k, _seed_for(cfg.seed, 1, k),
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


# -- retraining the found architecture from scratch -------------------------------------------------
def _reinitialise(module: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
            m.reset_running_stats()


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
    _reinitialise(module, _seed_for(cfg.seed, 3))
    opt = _optimizer(module, cfg)
    epochs = result.metrics[-1]["epochs"] if result.metrics else 0
    start = time.perf_counter()
    train_loss = float("nan")
    for e in tqdm(range(epochs), desc="retrain", unit="epoch", leave=False, disable=not _progress(progress)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, e, epochs)
        torch.manual_seed(_seed_for(cfg.seed, 4, e))
        train_loss = train_epoch(module, opt, train, loss_fn, where=f"retraining, epoch {e + 1}",
                                 device=torch.device(device))
    val_loss, val_acc = evaluate(module, val, loss_fn, device=torch.device(device))
    result.retrained = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc, "epochs": epochs,
                        "params": sum(p.numel() for p in module.parameters()),
                        "seconds": round(time.perf_counter() - start, 3)}
    return result.retrained
