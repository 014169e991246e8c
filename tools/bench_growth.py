"""Does growing pay? The net grown from the `vgg19` zoo seed on digits against three baselines.

For each of 3 seeds, all trained for the same number of epochs with the same optimizer and schedule:

  grown     morphir.grow from the seed (Gauss-Newton θ, the defaults of `morphir grow`)
  (a) seed  the seed trained without growing
  (b) fixed a fixed-width vgg19 whose parameter count is closest to the grown net's
  (c) noise the same growth with θ left at its random start (Net2Net-style noise) instead of learned

Prints a table (val accuracy mean ± std, params, the share of channels with a near-duplicate, see
`morphir.redundant_channels`) and exits non-zero unless
grown ≥ (b) − 0.5 points and grown > (c), on the mean.

    python tools/bench_growth.py [--seeds 3] [--phases 5] [--phase-epochs 20] [--jobs 1]

Single runs differ by a point or more with nothing but the seed (or the CPU thread count, i.e. the
order of floating-point sums) changed, so the table is followed by the paired per-seed differences
grown − (b) and grown − (c) with their standard error: when it is near the 0.5-point margin, the
verdict on 3 seeds is noise, and ``--seeds 20 --jobs 2`` measures it (about 50 min on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

import morphir
from _bench import verdict  # tools/ is the script's directory
from morphir.data import load_data


Result = tuple[float, int, float]  # val accuracy, params, share of channels with a near-duplicate


def run(model: torch.nn.Module, data, seed: int, phases: int, phase_epochs: int, **options) -> Result:
    res = morphir.grow(model, data.train, data.val, F.cross_entropy, progress=False, seed=seed, phases=phases,
                       phase_epochs=phase_epochs, **options)
    last = res.metrics[-1]
    return last["val_accuracy"], res.graph.num_params(), sum(last["redundant"].values()) / sum(last["widths"].values())


def build(seed: int, width: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return morphir.zoo.build("vgg19", (1, 8, 8), 10, width=width)


def closest_width(params: int) -> int:
    return min(range(2, 65), key=lambda w: abs(sum(p.numel() for p in build(0, w).parameters()) - params))


ARMS = ("grown", "(a) seed", "(b) fixed", "(c) noise")


def one_seed(seed: int, phases: int, phase_epochs: int, threads: int) -> dict[str, Result]:
    """The four nets of one seed (same data split and shuffles): arm -> (val accuracy, params)."""
    torch.set_num_threads(threads)
    data = load_data("digits", seed=seed, batch_size=64)
    grown = run(build(seed), data, seed, phases, phase_epochs)
    return {
        "grown": grown,
        "(a) seed": run(build(seed), data, seed, 1, phases * phase_epochs),
        "(b) fixed": run(build(seed, closest_width(grown[1])), data, seed, 1, phases * phase_epochs),
        "(c) noise": run(build(seed), data, seed, phases, phase_epochs, theta="random"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--phases", type=int, default=5)
    parser.add_argument("--phase-epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once, in separate processes of one thread each (default 1: one "
                             "process of up to 2 threads)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    rows: dict[str, list[Result]] = {arm: [] for arm in ARMS}
    epochs = args.phases * args.phase_epochs
    start = time.perf_counter()
    seeds = range(args.seeds)
    with contextlib.ExitStack() as stack:
        if args.jobs == 1:
            threads, mapper = max(1, min(2, torch.get_num_threads())), map
        else:  # spawned, not forked: a forked child inherits the parent's OpenMP pool and can hang in it
            threads, mapper = 1, stack.enter_context(
                ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))).map
        one = functools.partial(one_seed, phases=args.phases, phase_epochs=args.phase_epochs, threads=threads)
        for seed, result in zip(seeds, mapper(one, seeds), strict=True):
            for arm in ARMS:
                rows[arm].append(result[arm])
            print(f"seed {seed}: " + ", ".join(f"{k} {v[0]:.3f} ({v[1]:,} params)" for k, v in result.items()),
                  flush=True)

    def mean(name: str) -> float:
        return 100 * statistics.mean(r[0] for r in rows[name])

    print(f"\ndigits, vgg19 seed, {args.seeds} seeds, {epochs} epochs each ({time.perf_counter() - start:.0f} s)\n")
    print(f"| {'net':10} | {'val accuracy %':>16} | {'params':>15} | {'near-duplicate channels':>23} |")
    print(f"|{'-' * 12}|{'-' * 18}|{'-' * 17}|{'-' * 25}|")
    for name, vals in rows.items():
        accs = [100 * r[0] for r in vals]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        params = statistics.mean(r[1] for r in vals)
        dup = 100 * statistics.mean(r[2] for r in vals)
        print(f"| {name:10} | {statistics.mean(accs):9.2f} ± {std:4.2f} | {params:15,.0f} | {dup:22.0f}% |")
    # the seeds pair the nets (same data split and shuffles), so the paired differences and their
    # standard error say how far the verdict on the means is from noise
    for name in ("(b) fixed", "(c) noise"):
        diffs = [100 * (g[0] - b[0]) for g, b in zip(rows["grown"], rows[name], strict=True)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        print(f"grown - {name}: {statistics.mean(diffs):+.2f} ± {se:.2f} points (mean ± standard error of "
              f"the per-seed differences: {', '.join(f'{d:+.2f}' for d in diffs)})")
    failures = []
    if mean("grown") < mean("(b) fixed") - 0.5:
        failures.append(f"grown {mean('grown'):.2f} < fixed-width {mean('(b) fixed'):.2f} - 0.5")
    if not mean("grown") > mean("(c) noise"):
        failures.append(f"grown {mean('grown'):.2f} <= random θ {mean('(c) noise'):.2f}")
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
