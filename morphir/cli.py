"""The ``morphir`` command line.

    morphir inspect zoo:vgg19 --input-shape 1,3,32,32 [--json]
    morphir inspect model.pt --input-shape 1,3,32,32 [--allow-pickle]
    morphir score zoo:vgg19 --data digits [--epochs 3] [--exact] [--json] [--plot s.png]
    morphir grow zoo:vgg19 [--data digits|FILE.pt|FILE.npz|module:function] [--phases 5] [--out DIR] [--resume]
    morphir export grown/grown.pt --onnx grown.onnx --check --input-shape 1,1,8,8 --allow-pickle
    morphir report DIR

Errors go to stderr as ``morphir: error: ...`` with exit status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from morphir.engine import candidates, default_registry
from morphir.errors import MorphirError
from morphir.graph import MorphGraph, trace
from morphir.load import ZOO_PREFIX, resolve_model
from morphir.passes import builtin_growers

__all__ = ["main", "build_parser"]

DEFAULT_SHAPE = (1, 3, 32, 32)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write it as N,C,H,W, e.g. 1,3,32,32") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes with a batch dim, e.g. 1,3,32,32")
    return dims


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``morphir`` command."""
    parser = argparse.ArgumentParser(prog="morphir", description="Grow neural networks by rewriting their graphs.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show the traced graph's channel groups and candidate morphisms")
    p.add_argument("model", help="zoo:NAME (see morphir.zoo.names()) or a file written by torch.save(module)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape with batch, e.g. 1,3,32,32 (default for zoo models: 1,3,32,32)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a zoo model (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow classes other than torch.nn's when loading MODEL (runs code from the file)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("score", help="train briefly, then estimate every candidate's loss change (Gauss-Newton)")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module)")
    p.add_argument("--data", default="digits", choices=["digits"], help="data set (default: digits)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs before scoring (default 3)")
    p.add_argument("--batches", type=int, default=8, help="batches of --batch-size to score on (default 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--morphisms", default="split,prune", help="comma-separated morphisms to score (default split,prune)")
    p.add_argument("--exact", action="store_true", help="also measure each candidate's exact ΔL, and Spearman per group")
    p.add_argument("--plot", metavar="FILE.png", help="plot estimated against exact ΔL per group (needs --exact)")
    p.add_argument("--top", type=int, default=20, help="rows of the table (default 20; --json lists all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true", help="see `morphir inspect --help`")
    p.set_defaults(func=_score)

    p = sub.add_parser("grow", help="grow a model while it trains (Gauss-Newton morphisms); writes a run directory")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module)")
    p.add_argument("--method", default="gn", choices=list(builtin_growers()),
                   help="growth method (default gn, the Gauss-Newton method; see the README's comparison)")
    p.add_argument("--when", choices=["phases", "plateau"], default="phases",
                   help="grow after every phase (default) or when the training loss stops improving")
    p.add_argument("--patience", type=int, default=3,
                   help="with --when plateau: epochs without a 1%% improvement of the training loss before growing")
    p.add_argument("--budget-flops", type=float, default=None,
                   help="stop when training plus growth steps have spent this many FLOPs (e.g. 2e12); the learning "
                        "rate follows the budget and the last phase runs until it is spent")
    p.add_argument("--data", default="digits",
                   help="digits (default), a .pt/.npz file with x, y [, x_val, y_val], or module:function returning "
                        "(train, val) loaders")
    p.add_argument("--phases", type=int, default=5, help="training phases; a growth step follows each but the last (default 5)")
    p.add_argument("--phase-epochs", type=int, default=20, help="epochs per phase (default 20)")
    p.add_argument("--lam", type=float, default=None, help="λ of the criterion -ΔL > λ·ΔR (default 0: whatever is predicted to lower the loss)")
    p.add_argument("--resource", choices=["params", "flops"], default="params", help="what ΔR counts (default params)")
    p.add_argument("--top-fraction", type=float, default=0.3, help="most of a group's positive morphisms applied per phase")
    p.add_argument("--confidence", type=float, default=0.0,
                   help="apply a morphism only when -ΔL minus this many standard errors of its estimate still "
                        "exceeds λ·ΔR (default 0: the paper's rule; 2 grows about a third fewer parameters on "
                        "digits at the same accuracy)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate at the start of the cosine schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=None, help="classes of a zoo model (default: from the labels)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="also evaluate the grown net through torch.compile")
    p.add_argument("--retrain", action="store_true",
                   help="also train the found architecture from scratch for the same epochs and report both")
    p.add_argument("--theta", choices=["learned", "random"], default="learned", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="morphir-run", help="run directory (default ./morphir-run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="see `morphir inspect --help`")
    p.set_defaults(func=_grow)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check it with onnxruntime")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module) (e.g. a run's grown.pt)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--check", action="store_true", help="run onnxruntime and require max |Δ| <= 1e-4 against torch")
    p.add_argument("--input-shape", type=_shape, default=None, help="example input shape, e.g. 1,1,8,8")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a zoo model (default 10)")
    p.add_argument("--allow-pickle", action="store_true", help="needed for a run's grown.pt (a saved GraphModule)")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="regenerate report.png and a self-contained report.html from a run directory")
    p.add_argument("run_dir", help="a directory written by `morphir grow`")
    p.set_defaults(func=_report)
    return parser


def load_graph(spec: str, input_shape: tuple[int, ...] | None, num_classes: int, allow_pickle: bool) -> MorphGraph:
    """Load ``spec`` (``zoo:NAME`` or a file) and trace it with a zero input of ``input_shape``."""
    if input_shape is None:
        if not spec.startswith(ZOO_PREFIX):
            raise MorphirError(f"{spec}: give the example input shape with --input-shape N,C,H,W (e.g. 1,3,32,32)")
        input_shape = DEFAULT_SHAPE
    if spec.startswith(ZOO_PREFIX) and len(input_shape) != 4:
        raise MorphirError(f"zoo models take images: --input-shape must be N,C,H,W, got {','.join(map(str, input_shape))}")
    model = resolve_model(spec, input_shape=tuple(input_shape[1:]), num_classes=num_classes, allow_pickle=allow_pickle)
    return trace(model, torch.zeros(input_shape))


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
    }


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['nodes']} nodes, {report['params']:,} parameters, "
        f"{len(report['groups'])} channel groups ({report['growable_groups']} growable)",
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


def _inspect(args: argparse.Namespace) -> int:
    graph = load_graph(args.model, args.input_shape, args.num_classes, args.allow_pickle)
    report = inspect_report(graph, args.model)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _score(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from morphir.data import digits_loaders
    from morphir.scoring import ScoreConfig, exact_delta_losses, score, spearman
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
            if isinstance(y, torch.Tensor) and y.numel() and not y.dtype.is_floating_point:
                if int(y.min()) < 0:
                    raise DataError(f"{source}: a class label is {int(y.min())}; labels must be 0, 1, ..., classes - 1")
                top = max(top, int(y.max()))
    return top


def _check_fit(graph: MorphGraph, x: Any, top: int, source: str) -> None:
    """Run the model on a small batch of the data before any training: a clear error if they do not fit."""
    from morphir.errors import DataError

    inputs = x if isinstance(x, tuple) else (x,)
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


def _grow(args: argparse.Namespace) -> int:
    import shlex

    import torch.nn.functional as F

    from morphir.data import first_batch, load_data
    from morphir.errors import CheckpointError, DataError, TraceError
    from morphir.export import compile as compile_module
    from morphir.export import export_onnx, export_program
    from morphir.grow import GrowConfig, atomic_write, grow, phase_summary, retrain
    from morphir.report import write_report

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise MorphirError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    options = {"phases": args.phases, "phase_epochs": args.phase_epochs, "resource": args.resource,
               "top_fraction": args.top_fraction, "confidence": args.confidence, "lr": args.lr, "seed": args.seed,
               "theta": args.theta, "method": args.method, "when": args.when, "patience": args.patience,
               "budget_flops": args.budget_flops}
    if args.lam is not None:
        options["lam"] = args.lam
    cfg = GrowConfig(**options)
    out = args.out
    if not args.resume and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise CheckpointError(f"{out} already holds a run; continue it with --resume or choose another --out")
    torch.manual_seed(args.seed)
    data = load_data(args.data, seed=args.seed, batch_size=args.batch_size)
    x0, y0 = first_batch(data.train, data.source)
    first = x0[0] if isinstance(x0, tuple) else x0
    top_label = _label_range(data.source, data.train, data.val)
    num_classes = args.num_classes if args.num_classes is not None else max(top_label, 1) + 1
    try:
        graph = load_graph(args.model, (1, *first.shape[1:]), num_classes, args.allow_pickle)
    except TraceError as exc:
        raise DataError(f"{data.source}: samples of shape {tuple(first.shape[1:])} do not fit {args.model}: {exc}") from None
    _check_fit(graph, x0, top_label, data.source)
    identity = f"{args.model} on {args.data}, batch size {args.batch_size}"

    def show(record: dict[str, Any]) -> None:
        print(phase_summary(record), flush=True)

    command = "morphir " + " ".join(shlex.quote(a) for a in args.argv if a != "--resume") + " --resume"
    try:
        result = grow(graph, data.train, data.val, F.cross_entropy, config=cfg, run_dir=out, resume=args.resume,
                      identity=identity, device=args.device, on_phase=show)
    except KeyboardInterrupt:
        print(f"morphir: interrupted; the last finished phase is checkpointed in {out}. Resume with:\n  {command}",
              file=sys.stderr)
        return 130
    if args.retrain:
        retrain(result, data.train, data.val, F.cross_entropy, device=args.device)
    from morphir.grow import resolve_grower

    module = resolve_grower(cfg.method).finalize(result.graph).module  # e.g. template mixing baked into plain layers
    example = tuple(t[:1] for t in (x0 if isinstance(x0, tuple) else (x0,)))
    summary = {"model": args.model, "data": args.data, **result.summary()}
    if args.compile:
        from morphir.train import evaluate

        compiled = compile_module(result.graph, args.device, use_torch_compile=True)
        summary["compiled_val_loss"], summary["compiled_val_accuracy"] = evaluate(
            compiled, data.val, F.cross_entropy, device=torch.device(args.device))
    module.cpu()
    text = json.dumps(summary, indent=2) + "\n"
    buffer = io.BytesIO()
    torch.save(module, buffer)
    try:
        atomic_write(Path(out, "grown.pt"), lambda f: f.write(buffer.getvalue()))
        atomic_write(Path(out, "summary.json"), lambda f: f.write(text), binary=False)
    except OSError as exc:
        raise MorphirError(f"could not write the run's outputs to {out} ({exc.strerror or exc}); the checkpoint "
                           f"there is complete: free space and rerun with --resume to write them") from exc
    write_report(out)
    written = ["grown.pt", "summary.json", "metrics.jsonl", "report.png", "report.html", "checkpoint.pt"]
    if export_program(module, os.path.join(out, "grown.pt2"), example) is not None:
        written.append("grown.pt2")
    try:
        export_onnx(module, os.path.join(out, "grown.onnx"), example, check=True)
        written.append("grown.onnx")
    except MorphirError as exc:
        print(f"wrote {', '.join(written)} to {out}")
        raise MorphirError(f"the grown network could not be exported to ONNX: {exc}") from exc
    acc = summary["val_accuracy"]
    line = (f"grown {args.model}: {summary['seed_params']:,} -> {summary['final_params']:,} params, "
            f"{summary['final_flops']:,} FLOPs, val accuracy {acc:.3f} after {summary['phases']} phases "
            f"({summary['seconds']:.0f} s)")
    print(line)
    if result.retrained is not None:
        print(f"retrained from scratch ({result.retrained['epochs']} epochs): val accuracy "
              f"{result.retrained['val_accuracy']:.3f}")
    if args.compile:
        print(f"torch.compile: val accuracy {summary['compiled_val_accuracy']:.3f}")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from morphir.export import export_onnx

    graph = load_graph(args.model, args.input_shape, args.num_classes, args.allow_pickle)
    path = export_onnx(graph, args.onnx, check=args.check)
    print(f"wrote {path}" + (" (checked against onnxruntime: max |Δ| <= 1e-4)" if args.check else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    from morphir.report import write_report

    png, html = write_report(args.run_dir)
    print(f"wrote {png} and {html}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``morphir`` command; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MorphirError as exc:
        print(f"morphir: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("morphir: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `morphir inspect ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
