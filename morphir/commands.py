"""What each ``morphir`` command does, once its options are parsed (:mod:`morphir.cli`): load and
trace the model, check that the data fit it, run, print, write the run directory.

>>> from morphir.commands import load_graph
>>> graph = load_graph("zoo:vgg19", (1, 1, 8, 8), num_classes=10, allow_pickle=False)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from morphir.defaults import candidates, default_registry
from morphir.errors import MorphirError
from morphir.graph import MorphGraph
from morphir.tracing import trace
from morphir.load import ZOO_PREFIX, resolve_model

__all__ = ["DEFAULT_SHAPE", "OptionError", "check_run_dir", "inspect_report", "load_graph"]

log = logging.getLogger(__name__)

UNSET = object()  # an option left at GrowConfig's default


DEFAULT_SHAPE = (1, 3, 32, 32)


class OptionError(MorphirError):
    """Options that do not fit together: exit status 2, as argparse gives for a bad option."""


def load_graph(spec: str, input_shape: tuple[int, ...] | None, num_classes: int, allow_pickle: bool,
               widths: tuple[int, ...] | None = None) -> MorphGraph:
    """Load ``spec`` (``zoo:NAME`` or a file) and trace it with a zero input of ``input_shape``;
    ``widths``: the hidden widths of ``zoo:mlp`` where the spec gives none (a task's seed)."""
    mlp = spec == f"{ZOO_PREFIX}mlp" or spec.startswith(f"{ZOO_PREFIX}mlp:")
    if input_shape is None:
        if not spec.startswith(ZOO_PREFIX):
            raise MorphirError(f"{spec}: give the example input shape with --input-shape N,C,H,W (e.g. 1,3,32,32)")
        input_shape = DEFAULT_SHAPE
    if spec.startswith(ZOO_PREFIX) and not mlp and len(input_shape) != 4:
        raise MorphirError(f"zoo models take images: --input-shape must be N,C,H,W, got {','.join(map(str, input_shape))}")
    model = resolve_model(spec, input_shape=tuple(input_shape[1:]), num_classes=num_classes, allow_pickle=allow_pickle,
                          widths=widths)
    try:
        example = torch.zeros(input_shape)
    except RuntimeError as exc:
        raise MorphirError(f"--input-shape {','.join(map(str, input_shape))} is too large to allocate "
                           f"({str(exc).splitlines()[0]})") from None
    return trace(model, example)


def inspect_report(graph: MorphGraph, spec: str) -> dict[str, Any]:
    """A JSON-ready description of ``graph``: nodes, parameters, groups and candidate counts.

    >>> inspect_report(morphir.trace(model, x), "model.pt")["groups"][0]["name"]
    """
    groups = [
        {
            "name": g.name,
            "width": g.width,
            "growable": g.growable,
            "blocked": list(g.blocked),
            "nonlinear": g.nonlinear,
            "producers": [p.module for p in g.producers],
            "followers": [f.module for f in g.followers],
            "consumers": [{"module": c.module, "offset": c.segment.offset, "inner": c.segment.inner} for c in g.consumers],
            "params_per_channel": g.params_per_channel,
        }
        for g in graph.groups
    ]
    counts = {m.name: len(candidates(graph, m)) for m in default_registry()}
    return {
        "model": spec,
        "input_shape": [list(t.shape) for t in graph.example_inputs if isinstance(t, torch.Tensor)],
        "nodes": len(graph.module.graph.nodes),
        "params": graph.num_params(),
        "groups": groups,
        "growable_groups": sum(g["growable"] for g in groups),
        "candidates": counts,
        "fidelity": graph.fidelity.as_dict() if graph.fidelity is not None else None,
    }


def _fidelity_line(fid: dict[str, Any] | None) -> str:
    if fid is None:
        return "not checked"

    def mode(name: str, err: float | None) -> str:
        return f"{name} mode not checked" if err is None else f"{name} mode max |Δ| {err:.3g}"

    text = f"the traced graph computes what the model computes ({mode('eval', fid['eval_error'])}, " \
           f"{mode('train', fid['train_error'])})"
    if fid["leaves"]:
        text += f"; kept whole, as they read their training flag: {', '.join(fid['leaves'])}"
    if fid["fixed_args"]:
        text += f"; fixed to their defaults: {', '.join(fid['fixed_args'])}"
    return text + "".join(f"; {n}" for n in fid["notes"])


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['nodes']} nodes, {report['params']:,} parameters, "
        f"{len(report['groups'])} channel groups ({report['growable_groups']} growable)",
        f"fidelity: {_fidelity_line(report['fidelity'])}",
        "",
    ]
    rows = [("group", "width", "producers", "consumers", "growable")]
    for g in report["groups"]:
        why = "yes" if g["growable"] else "no: " + "; ".join(g["blocked"])
        if g["growable"] and not g["nonlinear"]:
            why += " (linear: no split)"
        rows.append((g["name"], str(g["width"]), ", ".join(g["producers"]) or "-",
                     ", ".join(c["module"] for c in g["consumers"]) or "-", why))
    widths = [min(max(len(r[i]) for r in rows), 40) for i in range(4)]

    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    for r in rows:
        lines.append("  ".join(cut(r[i], widths[i]).ljust(widths[i]) for i in range(4)) + "  " + r[4])
    lines.append("")
    lines.append("candidates: " + ", ".join(f"{k} {v}" for k, v in report["candidates"].items()))
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    graph = load_graph(args.model, args.input_shape, args.num_classes, args.allow_pickle)
    report = inspect_report(graph, args.model)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def run_score(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from morphir.data import digits_loaders
    from morphir.defaults import score
    from morphir.scoring import ScoreConfig, exact_delta_losses, spearman
    from morphir.train import evaluate, fit

    if args.plot and not args.exact:
        raise MorphirError("--plot draws estimated against exact ΔL: add --exact")
    if args.epochs < 0 or args.batches < 1:
        raise MorphirError("--epochs must be >= 0 and --batches >= 1")
    torch.manual_seed(args.seed)
    train, val = digits_loaders(seed=args.seed, batch_size=args.batch_size)
    x0 = next(iter(train))[0]
    graph = load_graph(args.model, (1, *x0.shape[1:]), 10, args.allow_pickle)
    if args.epochs:
        fit(graph.module, train, F.cross_entropy, epochs=args.epochs)
    val_loss, val_acc = evaluate(graph.module, val, F.cross_entropy)
    batches = [b for _, b in zip(range(args.batches), train)]
    names = [m.strip() for m in args.morphisms.split(",") if m.strip()]
    if not names:
        raise MorphirError("--morphisms names no morphism; give a comma-separated list, e.g. split,prune")
    cands = score(graph, batches, F.cross_entropy, names, config=ScoreConfig(seed=args.seed))
    exact = exact_delta_losses(graph, cands, batches, F.cross_entropy) if args.exact else [None] * len(cands)
    rows = [
        {"morphism": c.name, "site": str(c.site), "group": c.site.anchor, "estimate": c.estimate,
         "exact": e, "delta_params": c.delta_params, "delta_flops": c.delta_flops}
        for c, e in zip(cands, exact)
    ]
    per_group = {}
    if args.exact:
        for key in dict.fromkeys((r["morphism"], r["group"]) for r in rows):
            sel = [r for r in rows if (r["morphism"], r["group"]) == key]
            if len(sel) > 2:
                per_group[f"{key[0]}@{key[1]}"] = spearman([r["estimate"] for r in sel], [r["exact"] for r in sel])
    report = {"model": args.model, "val_loss": val_loss, "val_accuracy": val_acc, "candidates": rows,
              "spearman": per_group}
    if args.plot:
        _plot(rows, per_group, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: val loss {val_loss:.4f}, val accuracy {val_acc:.3f}; {len(rows)} candidates scored "
          f"on {len(batches)} batches")
    print(f"{'morphism':9} {'site':28} {'estimate':>10} " + (f"{'exact':>10} " if args.exact else "") + f"{'Δparams':>8}")
    for r in sorted(rows, key=lambda r: r["estimate"])[: args.top]:
        exact_text = f"{r['exact']:10.5f} " if args.exact else ""
        print(f"{r['morphism']:9} {r['site']:28} {r['estimate']:10.5f} {exact_text}{r['delta_params']:+8d}")
    if per_group:
        print("spearman (estimate vs exact) per group: " + ", ".join(f"{k} {v:.3f}" for k, v in per_group.items()))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _plot(rows: list[dict[str, Any]], spearman: dict[str, float], path: str) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["text.parse_math"] = False  # group names are text, not formulas (a CLI process: ours to set)
    keys = list(dict.fromkeys(f"{r['morphism']}@{r['group']}" for r in rows))
    cols = min(4, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 3.0 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        sel = [r for r in rows if f"{r['morphism']}@{r['group']}" == key]
        est, ex = [r["estimate"] for r in sel], [r["exact"] for r in sel]
        ax.scatter(ex, est, s=10)
        lo, hi = min(est + ex), max(est + ex)
        ax.plot([lo, hi], [lo, hi], lw=0.8, color="grey")
        title = key if key not in spearman else f"{key}\nSpearman {spearman[key]:.2f}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("exact ΔL", fontsize=8)
        ax.set_ylabel("estimated ΔL", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise MorphirError(f"cannot write the plot to {path}: {exc}") from exc
    finally:
        plt.close(fig)


def _label_range(source: str, *loaders: Any) -> int:
    """The largest class label over ``loaders`` (-1 when labels are not class indices); negative labels are refused."""
    from morphir.errors import DataError

    top = -1
    for batches in loaders:
        for _, y in batches:
            if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex or \
                    y.dtype == torch.bool or y.dim() != 1:
                what = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise DataError(f"{source}: labels are {what}; morphir grow trains classifiers: each batch's labels "
                                "must be a 1-d tensor of integer class indices")
            if y.numel():
                if int(y.min()) < 0:
                    raise DataError(f"{source}: a class label is {int(y.min())}; labels must be 0, 1, ..., classes - 1")
                top = max(top, int(y.max()))
    if top >= _MAX_CLASSES:
        raise DataError(f"{source}: a class label is {top}; more than {_MAX_CLASSES:,} classes are not class labels")
    return top


_MAX_CLASSES = 1_000_000


def _check_fit(graph: MorphGraph, x: Any, top: int, source: str, smallest: int | None = None, *,
               targets: torch.Tensor | None = None) -> None:
    """Run the model on a small batch of the data before any training: a clear error if they do not fit."""
    from morphir.errors import DataError

    inputs = x if isinstance(x, tuple) else (x,)
    for t in inputs:
        if not isinstance(t, torch.Tensor) or t.is_complex():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"{source}: a batch holds {what} inputs; morphir trains on real-valued tensors")
    small = tuple(t[:2] for t in inputs)
    try:
        with torch.no_grad():
            graph.module.eval()
            out = graph.module(*small)
    except Exception as exc:  # noqa: BLE001 - any failure here means data and model do not fit
        shapes = ", ".join(str(tuple(t.shape)) for t in small)
        raise DataError(f"{source}: batches of shape {shapes} do not fit the model ({type(exc).__name__}: {exc}); "
                        "check --input-shape/the data's sample shape") from None
    if isinstance(out, torch.Tensor) and top >= 0:
        if out.dim() != 2 or out.shape[1] <= top:
            raise DataError(f"{source}: labels go up to {top} but the model outputs shape {tuple(out.shape)}; "
                            "it needs one logit per class (set --num-classes for a zoo model)")
    if targets is not None and isinstance(out, torch.Tensor) and tuple(out.shape[1:]) != tuple(targets.shape[1:]):
        raise DataError(f"{source}: targets have shape {tuple(targets.shape[1:])} per sample but the model outputs "
                        f"{tuple(out.shape[1:])}; it needs one output per target number")
    if smallest == 1:
        try:
            copy.deepcopy(graph.module).train()(*(t[:1] for t in inputs))
        except Exception as exc:  # noqa: BLE001 - the model cannot train on one sample (batch norm)
            raise DataError(f"{source}: a training batch holds a single sample, and the model cannot train on one "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); use a --batch-size that "
                            "leaves at least two samples in the last batch (or drop_last=True in your loader)") from None


def _smallest_batch(batches: Any) -> int | None:
    """The fewest samples a training batch of ``batches`` can hold, where the loader says (else None)."""
    from torch.utils.data import DataLoader

    if isinstance(batches, DataLoader) and batches.batch_size and hasattr(batches.dataset, "__len__"):
        n, size = len(batches.dataset), batches.batch_size
        if batches.drop_last:
            return size if n >= size else None
        return n if n < size else (n % size or size)
    if isinstance(batches, (list, tuple)):
        sizes = [b[0][0].shape[0] if isinstance(b[0], tuple) else b[0].shape[0] for b in batches
                 if isinstance(b, (tuple, list)) and len(b) == 2]
        return min(sizes) if sizes else None
    return None


def run_grow(args: argparse.Namespace) -> int:
    import shlex

    from morphir.data import first_batch, load_data
    from morphir.errors import CheckpointError, DataError, TraceError
    from morphir.export import compile as compile_module
    from morphir.export import export_onnx, export_program
    from morphir.checkpoints import atomic_write
    from morphir.config import GrowConfig
    from morphir.defaults import grow
    from morphir.results import phase_summary, retrain
    from morphir.report import write_report

    options = {"phases": args.phases, "phase_epochs": args.phase_epochs, "resource": args.resource,
               "lr": args.lr, "schedule": args.schedule, "seed": args.seed,
               "theta": args.theta, "method": args.method, "when": args.when, "patience": args.patience,
               "budget_flops": args.budget_flops, "target_params": args.target_params,
               "target_flops": args.target_flops, "target_phase": args.target_phase}
    if args.target_factor is not UNSET:
        options["target_factor"] = args.target_factor
    lam_rule = {k: v for k, v in (("lam", args.lam), ("top_fraction", args.top_fraction),
                                  ("confidence", args.confidence)) if v is not None}
    options.update(lam_rule)
    if lam_rule and args.target_factor is UNSET and args.target_params is None and args.target_flops is None:
        options["target_factor"] = None  # the λ rule's options ask for the λ rule: no default target
    try:
        cfg = GrowConfig(**options)
    except MorphirError as exc:  # options that do not fit together (e.g. --target-phase past the last step)
        raise OptionError(f"grow: {exc}") from None
    out = args.out
    if not args.resume and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise CheckpointError(f"{out} already holds a run; continue it with --resume or choose another --out")
    check_run_dir(out, resume=args.resume)
    torch.manual_seed(args.seed)
    data = load_data(args.data, seed=args.seed, batch_size=args.batch_size)
    x0, y0 = first_batch(data.train, data.source)
    first = x0[0] if isinstance(x0, tuple) else x0
    if data.kind == "classification":
        top_label = _label_range(data.source, data.train, data.val)
        outputs = args.num_classes if args.num_classes is not None else max(top_label, 1) + 1
    else:  # regression: as many outputs as the targets have numbers
        top_label, outputs = -1, int(torch.Size(y0.shape[1:]).numel())
    try:
        graph = load_graph(args.model, (1, *first.shape[1:]), outputs, args.allow_pickle, widths=data.seed_widths)
    except TraceError as exc:
        raise DataError(f"{data.source}: samples of shape {tuple(first.shape[1:])} do not fit {args.model}: {exc}") from None
    val_x, val_y = first_batch(data.val, f"{data.source} (validation)")
    _check_fit(graph, x0, top_label, data.source, _smallest_batch(data.train),
               targets=y0 if data.kind == "regression" else None)
    _check_fit(graph, val_x, top_label, f"{data.source} (validation)",
               targets=val_y if data.kind == "regression" else None)
    loss_fn = data.loss
    identity = f"{args.model} on {args.data}, batch size {args.batch_size}"

    def show(record: dict[str, Any]) -> None:
        print(phase_summary(record), flush=True)

    command = "morphir " + " ".join(shlex.quote(a) for a in args.argv if a != "--resume") + " --resume"
    try:
        result = grow(graph, data.train, data.val, loss_fn, config=cfg, run_dir=out, resume=args.resume,
                      identity=identity, device=args.device, on_phase=show)
    except KeyboardInterrupt:
        print(f"morphir: interrupted; the last finished phase is checkpointed in {out}. Resume with:\n  {command}",
              file=sys.stderr)
        return 130
    if args.retrain:
        retrain(result, data.train, data.val, loss_fn, device=args.device)
    from morphir.defaults import resolve_grower

    module = resolve_grower(cfg.method).finalize(result.graph).module  # e.g. template mixing baked into plain layers
    example = tuple(t[:1] for t in (x0 if isinstance(x0, tuple) else (x0,)))
    summary = {"model": args.model, "data": args.data, **result.summary()}
    if args.compile:
        from morphir.train import evaluate

        compiled = compile_module(result.graph, args.device, use_torch_compile=True)
        summary["compiled_val_loss"], summary["compiled_val_accuracy"] = evaluate(
            compiled, data.val, loss_fn, device=torch.device(args.device))
    module.cpu()
    buffer = io.BytesIO()
    torch.save(module, buffer)
    try:
        atomic_write(Path(out, "grown.pt"), lambda f: f.write(buffer.getvalue()))
    except OSError as exc:
        raise MorphirError(f"could not write {Path(out, 'grown.pt')} ({exc.strerror or exc}); the checkpoint there is "
                           "complete: free space and rerun with --resume to write the run's outputs") from exc
    written = ["grown.pt"]
    exports: dict[str, str] = {}
    if export_program(module, os.path.join(out, "grown.pt2"), example) is not None:
        written.append("grown.pt2")
        exports["grown.pt2"] = "written"
    else:
        exports["grown.pt2"] = "not written: torch.export cannot export the model (the warning above says why)"
    onnx_failure: MorphirError | None = None
    try:
        export_onnx(module, os.path.join(out, "grown.onnx"), example, check=True, rtol=args.onnx_rtol,
                    atol=args.onnx_atol)
        written.append("grown.onnx")
        exports["grown.onnx"] = "written and checked in onnxruntime"
    except MorphirError as exc:
        onnx_failure = exc
        exports["grown.onnx"] = f"not written: {exc}"
    summary["exports"] = exports
    text = json.dumps(summary, indent=2) + "\n"
    try:
        atomic_write(Path(out, "summary.json"), lambda f: f.write(text), binary=False)
    except OSError as exc:
        raise MorphirError(f"could not write {Path(out, 'summary.json')} ({exc.strerror or exc}); the checkpoint "
                           "there is complete: free space and rerun with --resume to write the run's outputs") from exc
    write_report(out)
    written += ["summary.json", "metrics.jsonl", "report.png", "report.html", "checkpoint.pt"]
    line = (f"grown {args.model}: {summary['seed_params']:,} -> {summary['final_params']:,} params, "
            f"{summary['final_flops']:,} FLOPs, {_quality(summary['val_loss'], summary['val_accuracy'])} after "
            f"{summary['phases']} phases ({summary['seconds']:.0f} s)")
    print(line)
    if result.retrained is not None:
        print(f"retrained from scratch ({result.retrained['epochs']} epochs): "
              f"{_quality(result.retrained['val_loss'], result.retrained['val_accuracy'])}")
    if args.compile:
        print(f"torch.compile: {_quality(summary['compiled_val_loss'], summary['compiled_val_accuracy'])}")
    print(f"wrote {', '.join(written)} to {out}")
    if onnx_failure is not None:
        shape = ",".join(str(d) for d in (1, *first.shape[1:]))
        retry = (f"morphir export {shlex.quote(str(Path(out, 'grown.pt')))} --onnx "
                 f"{shlex.quote(str(Path(out, 'grown.onnx')))} --check --input-shape {shape} --allow-pickle "
                 f"--onnx-rtol {args.onnx_rtol:g} --onnx-atol {args.onnx_atol:g}")
        raise MorphirError(f"the grown network could not be exported to ONNX: {onnx_failure} Every other output is "
                           f"written (summary.json records why); retry the export with:\n  {retry}")
    return 0


def _quality(loss: float | None, accuracy: float | None) -> str:
    """``val accuracy 0.975`` for a classifier, ``val loss 0.2270`` otherwise."""
    return f"val accuracy {accuracy:.3f}" if accuracy is not None else f"val loss {loss:.4f}"


def check_run_dir(out: str, *, resume: bool) -> None:
    """Refuse, before any work, a run directory that cannot be written: a file, a path under one,
    a directory that could not be created, or one where a file cannot be made (read-only). Nothing
    is created here (a run that stops on bad data leaves no empty directory behind).

    >>> check_run_dir("runs/vgg19", resume=False)
    """
    from morphir.errors import CheckpointError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory; choose another --out")
    if not path.exists():
        if resume:
            raise CheckpointError(f"--out {out} does not exist: there is no run to resume; start it without --resume")
        parent = path.absolute().parent
        while not parent.exists():  # the run creates the missing directories: the first existing one decides
            parent = parent.parent
        if not parent.is_dir():
            raise CheckpointError(f"--out {out} cannot be created: {parent} is a file, not a directory; choose a "
                                  "writable place for the run")
        probe_dir = parent
    else:
        probe_dir = path
    probe = probe_dir / f".morphir-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
        probe.unlink()
    except OSError as exc:
        if resume:
            advice = ("resuming writes checkpoints there: make it writable, or copy the run directory somewhere "
                      "writable and resume there with --out")
        else:
            advice = "choose a writable place for the run"
        where = "" if probe_dir == path else f" (nothing can be created in {probe_dir})"
        raise CheckpointError(f"--out {out} is not writable{where} ({exc.strerror or exc}); {advice}") from None


def run_export(args: argparse.Namespace) -> int:
    from morphir.export import export_onnx

    graph = load_graph(args.model, args.input_shape, args.num_classes, args.allow_pickle)
    path = export_onnx(graph, args.onnx, check=args.check, rtol=args.onnx_rtol, atol=args.onnx_atol)
    checked = (f" (checked against onnxruntime: max |Δ| <= {args.onnx_atol:g} + {args.onnx_rtol:g} · max |y|)"
               if args.check else "")
    print(f"wrote {path}{checked}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from morphir.report import write_report

    png, html = write_report(args.run_dir)
    print(f"wrote {png} and {html}")
    return 0
