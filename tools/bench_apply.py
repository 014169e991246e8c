"""Benchmark: cost of applying N split candidates in ONE rewrite, on ``zoo:vgg19`` and on a
ResNet-50-shaped net.

What it measures
----------------
Two models. ``morphir.zoo.build("vgg19", (3, 32, 32), 10, width=W)`` (16 convs, W channels
each; W = 64 gives 1,024 split candidates), traced with ``morphir.trace(model,
torch.randn(1, 3, 32, 32))``, at sizes N (default 1, 10, 100, 1000); and
``morphir.zoo.build("resnet50", (3, 64, 64), 10, width=64)`` (bottleneck stages [3, 4, 6, 3],
widths 64 to 2048, 23.5M parameters, 11,456 split candidates) at N = all/10 and all. For every
size a fixed set of N
``split`` candidates is chosen deterministically, spread across the channel groups
(round-robin over the groups, channels shuffled with ``random.Random(seed)``), and the
wall-clock time of ``morphir.apply(g, chosen)`` is measured. θ is None (θ = 0), so the time
includes the engine's preservation check, which is part of every rewrite.

Each size gets one untimed warm-up and ``--repeats`` timed runs. The repetitions are
interleaved across the sizes (rep 1 of every size, then rep 2, ..., with the order of the
sizes rotated each round), so machine noise affects all sizes alike.

Every result is also checked for correctness (outside the timed region): the applied graph
must preserve the output (``morphir.output_mismatch(g, g2)`` err <= tol) and the sum of the
group widths must grow by exactly N.

Bounds (on the median times, and only for the sizes that were measured)
-----------------------------------------------------------------------
* vgg19: t(1000) <= 2.0 s                (when 1000 is among the sizes)
* vgg19: t(1000) / t(100) <= 12          (when both 100 and 1000 are among the sizes)
* resnet50: t(all) <= 3.0 s, and t(all) / t(all/10) <= 12

The exit status is 0 when every measured bound and every correctness check holds, 1 otherwise
(with a message naming what failed), 2 for bad arguments.

Usage::

    python tools/bench_apply.py [--repeats R] [--sizes 1,10,100,1000] [--width 64] [--threads T] [--no-resnet50]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

import morphir

MAX_T1000_S = 2.0
MAX_RATIO_1000_100 = 12.0
MAX_T_ALL_RESNET50_S = 3.0
MAX_RATIO_ALL_TENTH = 12.0
INPUT_SHAPE = (3, 32, 32)
RESNET50_SHAPE = (3, 64, 64)
NUM_CLASSES = 10


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(sizes))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per size, after one warm-up (default 5)")
    p.add_argument("--sizes", type=_parse_sizes, default=[1, 10, 100, 1000], help="comma-separated N (default 1,10,100,1000)")
    p.add_argument("--width", type=int, default=64, help="channels per conv of vgg19 (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and of the candidate choice (default 0)")
    p.add_argument("--resnet50-repeats", type=int, default=3, help="timed runs per size on resnet50 (default 3)")
    p.add_argument("--resnet50-width", type=int, default=64, help="resnet50's stem width (default 64: ResNet-50's widths)")
    p.add_argument("--no-resnet50", action="store_true", help="vgg19 alone")
    return p


def choose(cands: Sequence[morphir.Candidate], n: int, seed: int) -> list[morphir.Candidate]:
    """``n`` candidates spread across groups: round-robin over the groups, channels shuffled per group."""
    by_group: dict[str, list[morphir.Candidate]] = defaultdict(list)
    for c in cands:
        by_group[c.site.anchor].append(c)
    rng = random.Random(seed)
    queues = []
    for anchor in sorted(by_group):
        items = sorted(by_group[anchor], key=lambda c: c.site)
        rng.shuffle(items)
        queues.append(items)
    rng.shuffle(queues)
    chosen: list[morphir.Candidate] = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop())
    return chosen


def _width_sum(g: morphir.MorphGraph) -> int:
    return sum(grp.width for grp in g.groups)


def measure(g: morphir.MorphGraph, sizes: Sequence[int], repeats: int, seed: int,
            failures: list[str]) -> tuple[dict[int, list[float]], dict[int, int]]:
    """Times of ``morphir.apply(g, N splits)`` per size N (one warm-up, then ``repeats`` runs,
    interleaved across the sizes), each result checked outside the timed region."""
    cands = morphir.candidates(g, "split")
    chosen = {n: choose(cands, n, seed) for n in sizes}
    base_width, base_params = _width_sum(g), g.num_params()
    times: dict[int, list[float]] = {n: [] for n in sizes}
    params_after: dict[int, int] = {}
    sizes = list(sizes)
    for rnd in range(1 + repeats):
        k = rnd % len(sizes)
        for n in sizes[k:] + sizes[:k]:
            gc.collect()
            t0 = time.perf_counter()
            g2 = morphir.apply(g, chosen[n])
            dt = time.perf_counter() - t0
            if rnd > 0:
                times[n].append(dt)
            # correctness, outside the timed region
            err, tol = morphir.output_mismatch(g, g2)
            if not err <= tol:
                failures.append(f"N={n}: output changed by {err:.3g} (tolerance {tol:.3g})")
            grown = _width_sum(g2) - base_width
            if grown != n:
                failures.append(f"N={n}: group widths grew by {grown}, expected {n}")
            params_after[n] = g2.num_params()
            del g2
    if g.num_params() != base_params or _width_sum(g) != base_width:
        failures.append("the original graph was modified by apply")
    return times, params_after


def _table(sizes: Sequence[int], times: dict[int, list[float]], params_after: dict[int, int]) -> dict[int, float]:
    med = {n: statistics.median(ts) for n, ts in times.items()}
    print()
    print(f"{'N':>6} {'median s':>10} {'best s':>10} {'params after':>14}")
    for n in sizes:
        print(f"{n:>6} {med[n]:>10.4f} {min(times[n]):>10.4f} {params_after[n]:>14}")
    print()
    return med


def _bound(failures: list[str], what: str, value: float, limit: float, unit: str = "") -> None:
    if value > limit:
        failures.append(f"bound failed: {what} = {value:.3f}{unit} > {limit}{unit}")
    else:
        print(f"{what} = {value:.3f}{unit} <= {limit}{unit}: ok")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.repeats, args.width, args.resnet50_repeats, args.resnet50_width) < 1 or (args.threads is not None and args.threads < 1):
        print("error: --repeats, --resnet50-repeats, --width and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    g = morphir.trace(morphir.zoo.build("vgg19", INPUT_SHAPE, NUM_CLASSES, width=args.width), torch.randn(1, *INPUT_SHAPE))
    n_cands = len(morphir.candidates(g, "split"))
    too_big = [n for n in args.sizes if n > n_cands]
    if too_big:
        print(f"error: sizes {too_big} exceed the {n_cands} split candidates of vgg19 at width {args.width}", file=sys.stderr)
        return 2
    print(
        f"vgg19 width={args.width}: {len(g.groups)} groups, {n_cands} split candidates, "
        f"{g.num_params()} params; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"1 warm-up + {args.repeats} timed runs per size, interleaved"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other load skews the times)")
    failures: list[str] = []
    times, after = measure(g, args.sizes, args.repeats, args.seed, failures)
    med = _table(args.sizes, times, after)
    if 1000 in med:
        _bound(failures, "t(1000)", med[1000], MAX_T1000_S, " s")
    if 1000 in med and 100 in med:
        _bound(failures, "ratio t(1000)/t(100)", med[1000] / med[100], MAX_RATIO_1000_100)

    if not args.no_resnet50:
        torch.manual_seed(args.seed)
        model = morphir.zoo.build("resnet50", RESNET50_SHAPE, NUM_CLASSES, width=args.resnet50_width)
        r = morphir.trace(model, torch.randn(1, *RESNET50_SHAPE))
        total = len(morphir.candidates(r, "split"))
        sizes = [total // 10, total]
        print(f"\nresnet50 width={args.resnet50_width} on {'x'.join(map(str, RESNET50_SHAPE))}: {len(r.groups)} groups, {total} split "
              f"candidates, {r.num_params()} params; 1 warm-up + {args.resnet50_repeats} timed runs per size")
        times, after = measure(r, sizes, args.resnet50_repeats, args.seed, failures)
        med = _table(sizes, times, after)
        _bound(failures, f"t(all = {total})", med[total], MAX_T_ALL_RESNET50_S, " s")
        _bound(failures, f"ratio t({total})/t({total // 10})", med[total] / med[total // 10], MAX_RATIO_ALL_TENTH)

    if failures:
        seen = list(dict.fromkeys(failures))
        print("FAILED:\n  " + "\n  ".join(seen), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
