"""Every grower on the same seed net, data and training-compute budget, side by side.

Each method grows each task's seed net under one FLOPs budget per task (tasks: ``teacher`` and
``clusters``, from a ``zoo:mlp`` seed, and ``digits_augmented``, from a width-4 vgg19, where width
matters, and ``digits``, from the vgg19 seed; see docs/tasks.md): training costs 3 × the
forward FLOPs per sample per epoch of the network as it is at that epoch, and each growth step's
own torch operations are counted too (scoring passes, overgrown networks, a second network
trained for fusion...). The learning rate follows the cosine in the share of the budget spent and
the run stops when it is spent, so a method that grows bigger sooner trains for fewer epochs.

Prints a markdown table per task (method, val loss and accuracy mean ± std, final params,
training FLOPs, growth-step seconds, mean loss jump at growth, epochs), writes them to ``--out``
and plots val loss against parameters, one panel per task, to ``--plot``. Runs go ``--jobs`` at a
time, each in its own process with one thread.

    python tools/compare_growers.py --jobs 2                    # 3 seeds, the new tasks
    python tools/compare_growers.py --tasks digits              # the earlier comparison
    python tools/compare_growers.py --quick                     # 1 seed, tiny budget
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
from pathlib import Path

import torch

import bench_growth  # tools/ is the script's directory
import morphir
from morphir.data import load_data
from morphir.load import resolve_model
from morphir.passes import builtin_growers


TASKS = bench_growth.TASKS
seed_spec = bench_growth.seed_spec  # each task's seed net, as the growth bench grows it


def seed_net(task: str, seed: int, data: morphir.Data) -> torch.nn.Module:
    x0, y0 = next(iter(data.train))
    outputs = int(max(int(y.max()) for _, y in data.train)) + 1 if data.kind == "classification" else y0.shape[1]
    torch.manual_seed(seed)
    return resolve_model(seed_spec(task), input_shape=tuple(x0.shape[1:]), num_classes=outputs)


def budget_for(task: str, epochs: float, factor: float) -> float:
    """FLOPs of training a net with ``factor`` × the seed's forward FLOPs for ``epochs`` epochs."""
    data = load_data(task, seed=0, batch_size=64)
    x0, _ = next(iter(data.train))
    seed = morphir.trace(seed_net(task, 0, data), x0[:1])
    return 3.0 * factor * morphir.count_flops(seed) * len(data.train.dataset) * epochs


def run(unit: tuple[str, str, int], args: argparse.Namespace, budgets: dict[str, float]) -> dict:
    task, method, seed = unit
    torch.set_num_threads(1)
    data = load_data(task, seed=seed, batch_size=64)
    start = time.perf_counter()
    res = morphir.grow(seed_net(task, seed, data), data.train, data.val, data.loss, method=method, seed=seed,
                       phases=args.phases, phase_epochs=args.phase_epochs, budget_flops=budgets[task],
                       score_batches=args.score_batches, progress=False)
    jumps = [m["loss_jump"] for m in res.metrics if m.get("loss_jump") is not None]
    acc = res.metrics[-1]["val_accuracy"]
    return {
        "loss": res.metrics[-1]["val_loss"],
        "acc": None if acc is None else 100 * acc,
        "params": res.graph.num_params(),
        "flops": res.metrics[-1]["train_flops"],
        "growth_s": sum(m.get("growth_seconds", 0.0) for m in res.metrics),
        "jump": statistics.mean(jumps) if jumps else 0.0,
        "epochs": res.metrics[-1]["epochs"],
        "seconds": time.perf_counter() - start,
    }


def _spread(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows: dict[str, list[dict]]) -> str:
    """One task's markdown table, best val loss first.

    >>> print(table({"gn": [run_result, ...], ...}))
    """
    lines = ["| method | val loss | val accuracy % | final params | training FLOPs | growth-step s | mean loss jump "
             "| epochs |", "|---|---|---|---|---|---|---|---|"]
    for method, runs in sorted(rows.items(), key=lambda kv: statistics.mean(r["loss"] for r in kv[1])):
        accs = [r["acc"] for r in runs if r["acc"] is not None]
        mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        lines.append(f"| {method} | {_spread([r['loss'] for r in runs], 4)} | {_spread(accs, 2) if accs else '-'} | "
                     f"{mean('params'):,.0f} | {mean('flops'):.3g} | {mean('growth_s'):.1f} | {mean('jump'):+.4f} | "
                     f"{mean('epochs'):.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, (task, rows) in zip(axes[0], results.items()):
        for method, runs in rows.items():
            ax.scatter([r["params"] for r in runs], [r["loss"] for r in runs], label=method, s=28)
        ax.set_xlabel("final parameters")
        ax.set_ylabel("val loss")
        ax.set_title(f"{task} ({seed_spec(task)} seed, one FLOPs budget)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS[:3]), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--methods", default=",".join(builtin_growers()), help="comma-separated growers")
    parser.add_argument("--budget-epochs", type=float, default=40,
                        help="the budget: FLOPs of training a net of --budget-factor × the seed's FLOPs this many epochs")
    parser.add_argument("--budget-factor", type=float, default=2.0)
    parser.add_argument("--phases", type=int, default=5)
    parser.add_argument("--phase-epochs", type=int, default=5)
    parser.add_argument("--score-batches", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with one thread")
    parser.add_argument("--quick", action="store_true", help="1 seed, a tiny budget: every method in a few minutes")
    parser.add_argument("--out", type=Path, default=Path("compare_growers.md"))
    parser.add_argument("--plot", type=Path, default=Path("compare_growers.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budget_epochs, args.phases, args.phase_epochs, args.score_batches = 1, 4, 3, 1, 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(methods) - set(builtin_growers())) + sorted(set(tasks) - set(TASKS))
    if unknown or args.seeds < 1 or args.jobs < 1 or not methods or not tasks:
        print(f"unknown methods or tasks {unknown}; built in: {', '.join(builtin_growers())}; tasks: "
              f"{', '.join(TASKS)}; --seeds and --jobs at least 1", file=sys.stderr)
        return 2
    budgets = {t: budget_for(t, args.budget_epochs, args.budget_factor) for t in tasks}
    units = [(t, m, s) for t in tasks for m in methods for s in range(args.seeds)]
    results: dict[str, dict[str, list[dict]]] = {t: {m: [] for m in methods} for t in tasks}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        mapper = map
        if args.jobs > 1:  # spawned, not forked: a forked child inherits the parent's OpenMP pool and can hang in it
            mapper = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))).map
        for (task, method, seed), r in zip(units, mapper(functools.partial(run, args=args, budgets=budgets), units),
                                           strict=True):
            results[task][method].append(r)
            acc = "" if r["acc"] is None else f"acc {r['acc']:.2f}, "
            print(f"{task} {method} seed {seed}: val loss {r['loss']:.4f}, {acc}{r['params']:,} params, "
                  f"{r['flops']:.3g} FLOPs, {r['epochs']} epochs, growth {r['growth_s']:.1f} s ({r['seconds']:.0f} s)",
                  flush=True)
    text = (f"{args.seeds} seed(s) per method; budget per task = {args.budget_factor:g} × the seed's FLOPs for "
            f"{args.budget_epochs:g} epochs; growth every {args.phase_epochs} epochs up to {args.phases - 1} times "
            f"({time.perf_counter() - start:.0f} s)\n")
    for task in tasks:
        text += f"\n### {task} ({seed_spec(task)} seed, budget {budgets[task]:.3g} FLOPs)\n\n" + table(results[task]) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
