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

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from morphir.checkpoints import CHECKPOINT, METRICS, RunState, checkpoint_of, read_checkpoint, restore, save_checkpoint
from morphir.config import GrowConfig
from morphir.errors import CheckpointError, MorphirError, TrainingError
from morphir.graph import MorphGraph
from morphir.growers import Grower
from morphir.growth_step import grow_step
from morphir.morphism import Registry
from morphir.redundancy import redundant_channels
from morphir.results import GrowResult, phase_summary, retrain
from morphir.scoring import LossFn
from morphir.selection import count_flops, select
from morphir.tracing import trace
from morphir.train import cosine_lr, evaluate, recalibrate_batch_norm, seed_for, sgd, show_progress, train_epoch

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "GrowConfig",
    "GrowResult",
    "count_flops",
    "grow",
    "phase_summary",
    "recalibrate_batch_norm",
    "resolve_grower",
    "retrain",
    "select",
]

log = logging.getLogger(__name__)

def _widths(graph: MorphGraph) -> dict[str, int]:
    return {grp.name: grp.width for grp in graph.groups if grp.growable}


def resolve_grower(method: str | Grower, growers: Mapping[str, Grower] | None = None) -> Grower:
    """The grower called ``method`` in ``growers`` (a :class:`Grower` instance is returned as is;
    ``morphir.resolve_grower`` looks names up among the built-ins).

    >>> resolve_grower("net2net", morphir.passes.builtin_growers())
    <grower net2net>
    """
    if isinstance(method, Grower):
        return method
    if not growers:
        raise MorphirError(f"the growth method {method!r} is given by name but no growers were given to look it up in: "
                           "pass growers=morphir.passes.builtin_growers(), or the Grower itself")
    if method not in growers:
        raise MorphirError(f"unknown growth method {method!r}; known: {', '.join(growers)}")
    return growers[method]


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
    growers: Mapping[str, Grower] | None = None,
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
    ``method`` (a :class:`Grower`, or a name looked up in ``growers``) and ``registry`` (the
    morphisms candidates are drawn from; the grower's own are added) are what ``morphir.grow``
    defaults to the built-ins.

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
    grower = resolve_grower(method if isinstance(method, Grower) else cfg.method, growers)
    registry = registry if registry is not None else Registry()
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
        ckpt = read_checkpoint(out_dir)
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
        state = restore(seed_graph, ckpt, cfg, grower, registry, dev)
        state.grower_settings = grower.settings()
        log.info("resuming after phase %d of %d from %s", state.phase, cfg.phases, out_dir)
    else:
        seed_graph.module.to(dev)
        state = RunState(seed_graph, sgd(seed_graph.module, cfg), 0, [], [], 0.0,
                       grower_settings=grower.settings())
        if out_dir is not None:
            save_checkpoint(out_dir, checkpoint_of(state, cfg, identity))

    show = show_progress(progress)
    phases_bar = tqdm(total=cfg.phases, initial=state.phase, desc="phases", unit="phase", disable=not show,
                      dynamic_ncols=True)
    n_train = _num_samples(train)
    try:
        while not state.done and state.phase < cfg.phases:
            _run_phase(state, cfg, train, val, loss_fn, grower, registry, dev, show, out_dir, n_train)
            if out_dir is not None:
                save_checkpoint(out_dir, checkpoint_of(state, cfg, identity))
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


def _restart_point(state: RunState, cfg: GrowConfig) -> tuple[int, float]:
    """Epochs and FLOPs spent when the cosine last started: at the last growth step that changed the
    network with ``schedule="restart"`` (read from the metrics, so a resumed run finds it too), else 0."""
    if cfg.schedule == "restart":
        for m in reversed(state.metrics):
            if m.get("applied"):
                return int(m["epochs"]), float(m["train_flops"])
    return 0, 0.0


def _lr_now(state: RunState, cfg: GrowConfig) -> float:
    epoch0, flops0 = _restart_point(state, cfg)
    if cfg.budget_flops is not None:  # the cosine in the share of the compute budget spent
        left = cfg.budget_flops - flops0
        share = (state.flops - flops0) / left if left > 0 else 1.0
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(max(share, 0.0), 1.0)))
    return cosine_lr(cfg, state.epoch - epoch0, cfg.epochs - epoch0)


def _run_phase(state: RunState, cfg: GrowConfig, train: Iterable[tuple[Any, Any]], val: Iterable[tuple[Any, Any]],
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
            torch.manual_seed(seed_for(cfg.seed, 0, e))
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
            grow_step(state, cfg, train, loss_fn, grower, registry, record, k)
        except TrainingError as exc:
            raise TrainingError(f"growth after phase {k} failed: {exc}; the run stopped{where_ckpt}") from None
    record["train_flops"] = state.flops
    record["seconds"] = round(time.perf_counter() - start, 3)
    state.seconds += record["seconds"]
    state.metrics.append(record)
    state.phase = k
