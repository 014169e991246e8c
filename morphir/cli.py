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
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from morphir.errors import MorphirError
from morphir.export import ONNX_ATOL, ONNX_RTOL
from morphir.passes import builtin_growers
from morphir.commands import UNSET, OptionError, check_run_dir, run_export, run_grow, run_inspect, run_report, run_score

__all__ = ["OptionError", "build_parser", "check_run_dir", "main"]

log = logging.getLogger(__name__)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write it as N,C,H,W, e.g. 1,3,32,32") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes with a batch dim, e.g. 1,3,32,32")
    return dims


def _number(kind: type, *, low: float | None = None, strict: bool = False, high: float | None = None) -> Any:
    """An argparse ``type`` for a finite number of ``kind`` within bounds (``strict``: above ``low``)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_COUNT = _number(int, low=1)  # a positive integer


_NATURAL = _number(int, low=0)  # an integer >= 0


_SEED = _number(int, low=0, high=2**62)


_POSITIVE = _number(float, low=0, strict=True)




def _target_factor(text: str) -> float | None:
    """``--target-factor``: a number above 1, or ``none``."""
    if text.strip().lower() == "none":
        return None
    return _number(float, low=1, strict=True)(text)


def _default_factor() -> str:
    from morphir.config import GrowConfig

    factor = GrowConfig().target_factor
    return "none" if factor is None else f"{factor:g}"


_NONNEGATIVE = _number(float, low=0)


_CLASSES = _number(int, low=2)


def _device(text: str) -> str:
    """An argparse ``type`` for ``--device``: a device torch knows that this machine has."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: morphir runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _onnx_tolerances(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-rtol", type=_NONNEGATIVE, default=ONNX_RTOL,
                   help=f"the ONNX check allows max |Δ| <= atol + rtol · max |y| per output (default {ONNX_RTOL:g})")
    p.add_argument("--onnx-atol", type=_NONNEGATIVE, default=ONNX_ATOL,
                   help=f"the ONNX check's absolute part (default {ONNX_ATOL:g})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``morphir`` command."""
    parser = argparse.ArgumentParser(prog="morphir", description="Grow neural networks by rewriting their graphs.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show the traced graph's channel groups and candidate morphisms")
    p.add_argument("model", help="zoo:NAME (see morphir.zoo.names()) or a file written by torch.save(module)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape with batch, e.g. 1,3,32,32 (default for zoo models: 1,3,32,32)")
    p.add_argument("--num-classes", type=_CLASSES, default=10, help="classes of a zoo model (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow classes other than torch.nn's when loading MODEL (runs code from the file)")
    p.set_defaults(func=run_inspect)

    p = sub.add_parser("score", help="train briefly, then estimate every candidate's loss change (Gauss-Newton)")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module)")
    p.add_argument("--data", default="digits", choices=["digits"], help="data set (default: digits)")
    p.add_argument("--epochs", type=_NATURAL, default=3, help="training epochs before scoring (default 3)")
    p.add_argument("--batches", type=_COUNT, default=8, help="batches of --batch-size to score on (default 8)")
    p.add_argument("--batch-size", type=_COUNT, default=64)
    p.add_argument("--morphisms", default="split,prune", help="comma-separated morphisms to score (default split,prune)")
    p.add_argument("--exact", action="store_true", help="also measure each candidate's exact ΔL, and Spearman per group")
    p.add_argument("--plot", metavar="FILE.png", help="plot estimated against exact ΔL per group (needs --exact)")
    p.add_argument("--top", type=_COUNT, default=20, help="rows of the table (default 20; --json lists all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--allow-pickle", action="store_true", help="see `morphir inspect --help`")
    p.set_defaults(func=run_score)

    p = sub.add_parser("grow", help="grow a model while it trains (Gauss-Newton morphisms); writes a run directory")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module)")
    p.add_argument("--method", default="gn", choices=list(builtin_growers()),
                   help="growth method (default gn, the Gauss-Newton method; compared in docs/growers.md)")
    p.add_argument("--when", choices=["phases", "plateau"], default="phases",
                   help="grow after every phase (default) or when the training loss stops improving")
    p.add_argument("--patience", type=_COUNT, default=3,
                   help="with --when plateau: epochs without a 1%% improvement of the training loss before growing")
    p.add_argument("--budget-flops", type=_POSITIVE, default=None,
                   help="stop when training plus growth steps have spent this many FLOPs (e.g. 2e12); the learning "
                        "rate follows the budget and the last phase runs until it is spent")
    p.add_argument("--data", default="digits",
                   help="digits (default), a bundled task (teacher, clusters, digits_augmented), a .pt/.npz file "
                        "with x, y [, x_val, y_val], or module:function returning (train, val) loaders")
    p.add_argument("--phases", type=_COUNT, default=5, help="training phases; a growth step follows each but the last (default 5)")
    p.add_argument("--phase-epochs", type=_COUNT, default=20, help="epochs per phase (default 20)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-params", type=_COUNT, default=None,
                        help="grow to this many parameters by the growth step after --target-phase; each step adds "
                             "its share and the scores decide where (instead of the λ rule)")
    target.add_argument("--target-flops", type=_POSITIVE, default=None,
                        help="as --target-params, in FLOPs per sample")
    target.add_argument("--target-factor", type=_target_factor, default=UNSET,
                        help="grow to this many times the seed's size (parameters, or FLOPs with --resource flops) "
                             "by the growth step after --target-phase; 'none': no target, the λ rule decides how "
                             f"much (default {_default_factor()}; none when --lam is given without a target)")
    p.add_argument("--target-phase", type=_COUNT, default=None,
                   help="the phase after which the target size is reached (default: half the phases, rounded up)")
    p.add_argument("--lam", type=_NONNEGATIVE, default=None,
                   help="λ of the criterion -ΔL > λ·ΔR (default 0: whatever is predicted to lower the loss); this, "
                        "--top-fraction and --confidence are the λ rule's: given without a --target-*, they ask "
                        "for the λ rule instead of the default target")
    p.add_argument("--resource", choices=["params", "flops"], default="params", help="what ΔR counts (default params)")
    p.add_argument("--top-fraction", type=_number(float, low=0, strict=True, high=1), default=None,
                   help="with the λ rule: most of a group's positive morphisms applied per phase (default 0.3)")
    p.add_argument("--confidence", type=_NONNEGATIVE, default=None,
                   help="apply a morphism only when -ΔL minus this many standard errors of its estimate still "
                        "exceeds λ·ΔR (default 0: the paper's rule; 2 grows about a third fewer parameters on "
                        "digits at the same accuracy)")
    p.add_argument("--lr", type=_number(float, low=0, strict=True, high=1e3), default=0.05, help="SGD learning rate at the start of the cosine schedule")
    p.add_argument("--schedule", choices=["restart", "cosine"], default="restart",
                   help="restart (default): the cosine starts again from --lr after every growth step that changed "
                        "the network; cosine: one cosine over the whole run")
    p.add_argument("--batch-size", type=_COUNT, default=64)
    p.add_argument("--num-classes", type=_CLASSES, default=None, help="classes of a zoo model (default: from the labels)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--compile", action="store_true", help="also evaluate the grown net through torch.compile")
    p.add_argument("--retrain", action="store_true",
                   help="also train the found architecture from scratch for the same epochs and report both")
    p.add_argument("--theta", choices=["learned", "random"], default="learned", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--out", default="morphir-run", help="run directory (default ./morphir-run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="see `morphir inspect --help`")
    _onnx_tolerances(p)
    p.set_defaults(func=run_grow)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check it with onnxruntime")
    p.add_argument("model", help="zoo:NAME or a file written by torch.save(module) (e.g. a run's grown.pt)")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--check", action="store_true",
                   help="run the file in onnxruntime and require max |Δ| <= atol + rtol · max |y| against torch")
    p.add_argument("--input-shape", type=_shape, default=None, help="example input shape, e.g. 1,1,8,8")
    p.add_argument("--num-classes", type=_CLASSES, default=10, help="classes of a zoo model (default 10)")
    p.add_argument("--allow-pickle", action="store_true", help="needed for a run's grown.pt (a saved GraphModule)")
    _onnx_tolerances(p)
    p.set_defaults(func=run_export)

    p = sub.add_parser("report", help="regenerate report.png and a self-contained report.html from a run directory")
    p.add_argument("run_dir", help="a directory written by `morphir grow`")
    p.set_defaults(func=run_report)
    return parser


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
    except OptionError as exc:
        print(f"morphir: error: {exc}", file=sys.stderr)
        return 2
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
