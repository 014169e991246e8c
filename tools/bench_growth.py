"""Does growing pay? The net grown from the `vgg19` zoo seed on digits against three baselines.

For each of 3 seeds, all trained for the same number of epochs with the same optimizer and schedule:

  grown     morphir.grow from the seed (Gauss-Newton θ, the defaults of `morphir grow`)
  (a) seed  the seed trained without growing
  (b) fixed a fixed-width vgg19 whose parameter count is closest to the grown net's
  (c) noise the same growth with θ left at its random start (Net2Net-style noise) instead of learned

Prints a table (val accuracy mean ± std, params) and exits non-zero unless
grown ≥ (b) − 0.5 points and grown > (c), on the mean.

    python tools/bench_growth.py [--seeds 3] [--phases 5] [--phase-epochs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import morphir
from _bench import verdict  # tools/ is the script's directory
from morphir.data import load_data


def run(model: torch.nn.Module, data, seed: int, phases: int, phase_epochs: int, **options) -> tuple[float, int]:
    res = morphir.grow(model, data.train, data.val, F.cross_entropy, progress=False, seed=seed, phases=phases,
                       phase_epochs=phase_epochs, **options)
    return res.metrics[-1]["val_accuracy"], res.graph.num_params()


def build(seed: int, width: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return morphir.zoo.build("vgg19", (1, 8, 8), 10, width=width)


def closest_width(params: int) -> int:
    return min(range(2, 65), key=lambda w: abs(sum(p.numel() for p in build(0, w).parameters()) - params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--phases", type=int, default=5)
    parser.add_argument("--phase-epochs", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows: dict[str, list[tuple[float, int]]] = {"grown": [], "(a) seed": [], "(b) fixed": [], "(c) noise": []}
    epochs = args.phases * args.phase_epochs
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = load_data("digits", seed=seed, batch_size=64)
        grown = run(build(seed), data, seed, args.phases, args.phase_epochs)
        rows["grown"].append(grown)
        rows["(a) seed"].append(run(build(seed), data, seed, 1, epochs))
        rows["(b) fixed"].append(run(build(seed, closest_width(grown[1])), data, seed, 1, epochs))
        rows["(c) noise"].append(run(build(seed), data, seed, args.phases, args.phase_epochs, theta="random"))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1][0]:.3f} ({v[-1][1]:,} params)" for k, v in rows.items()),
              flush=True)

    def mean(name: str) -> float:
        return 100 * statistics.mean(a for a, _ in rows[name])

    print(f"\ndigits, vgg19 seed, {args.seeds} seeds, {epochs} epochs each ({time.perf_counter() - start:.0f} s)\n")
    print(f"| {'net':10} | {'val accuracy %':>16} | {'params':>15} |")
    print(f"|{'-' * 12}|{'-' * 18}|{'-' * 17}|")
    for name, vals in rows.items():
        accs = [100 * a for a, _ in vals]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        params = statistics.mean(p for _, p in vals)
        print(f"| {name:10} | {statistics.mean(accs):9.2f} ± {std:4.2f} | {params:15,.0f} |")
    failures = []
    if mean("grown") < mean("(b) fixed") - 0.5:
        failures.append(f"grown {mean('grown'):.2f} < fixed-width {mean('(b) fixed'):.2f} - 0.5")
    if not mean("grown") > mean("(c) noise"):
        failures.append(f"grown {mean('grown'):.2f} <= random θ {mean('(c) noise'):.2f}")
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
