"""Checkpoints of a growth run: the state a run carries between phases, written atomically and
checksummed, read back with every field validated, and restored by replaying the applied
morphisms on the seed (so no code is unpickled).

>>> save_checkpoint(run_dir, checkpoint_of(state, cfg, identity))
>>> state = restore(seed_graph, read_checkpoint(run_dir), cfg, grower, registry)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from morphir import files
from morphir.config import GrowConfig
from morphir.errors import CheckpointError, MorphirError
from morphir.graph import MorphGraph
from morphir.growers import Grower
from morphir.morphism import Registry
from morphir.train import sgd

__all__ = ["CHECKPOINT", "METRICS", "RunState", "atomic_write", "checkpoint_of", "read_checkpoint", "restore", "save_checkpoint",
           "write_metrics"]

log = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.pt"


METRICS = "metrics.jsonl"


_FORMAT = 3  # 3: with a checksum of the content; 2 (no checksum) is still read


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


def write_metrics(run_dir: Path, metrics: Sequence[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write(run_dir / METRICS, lambda f: f.write(text), binary=False)


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class RunState:
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


def checkpoint_of(state: RunState, cfg: GrowConfig, identity: str) -> dict[str, Any]:
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


def save_checkpoint(run_dir: Path, ckpt: Mapping[str, Any]) -> None:
    path = run_dir / CHECKPOINT
    buffer = io.BytesIO()  # serialise first: a failing file write is then a plain OSError
    torch.save({**ckpt, "checksum": _digest(dict(ckpt))}, buffer)
    data = buffer.getvalue()
    for target, write in ((path, lambda f: f.write(data)),
                          (run_dir / METRICS, None)):
        try:
            if write is None:
                write_metrics(run_dir, json.loads(ckpt["metrics"]))
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


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
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


def restore(seed_graph: MorphGraph, ckpt: Mapping[str, Any], cfg: GrowConfig, grower: Grower, registry: Registry,
             device: torch.device) -> RunState:
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
        opt = sgd(module, cfg)
        _load_state(module, opt, ckpt["optimizer_state"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's weights or optimizer state cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); start a fresh run in another directory") from None
    return RunState(graph, opt, int(ckpt["phase"]), json.loads(ckpt["metrics"]), list(ckpt["log"]),
                  float(ckpt["seconds"]), int(ckpt["epoch"]), float(ckpt["flops"]), bool(ckpt["done"]))

