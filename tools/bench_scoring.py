"""What Gauss-Newton scoring costs, against a training step and against brute force.

On the `vgg19` zoo seed (digits, batch 64), measured side by side in one run:

(a) one scoring step covering every split and prune candidate of every group, divided by one
    plain training step (forward, backward, SGD step) of the same net: must be ≤ 2.5;
(b) the speedup of GN scoring over measuring the same candidates exactly with
    `exact_delta_losses` on the same batches (one expanded network per candidate), at 64, 256 and
    all candidates: with all candidates it must be ≥ 50×;
(c) the peak memory a scoring step adds, relative to a training step (each in a fresh process,
    with glibc returning freed memory at once so the resident high-water mark follows live tensors).

    python tools/bench_scoring.py [--repeats 7] [--batches 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import morphir
from _bench import verdict  # tools/ is the script's directory
from morphir.data import digits_loaders


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = morphir.zoo.build("vgg19", (1, 8, 8), 10)
    train, _ = digits_loaders(seed=seed, batch_size=64)
    batches = [b for _, b in zip(range(8), train)]
    graph = morphir.trace(model, torch.zeros(1, 1, 8, 8))
    return model, graph, batches


def train_step(model, opt, x, y) -> None:
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1))


def peak_kib(kind: str) -> int:
    """Peak resident memory (KiB) that one step of ``kind`` adds above the memory before it.

    Run in a fresh process whose glibc serves allocations with mmap (MALLOC_MMAP_THRESHOLD_), so
    freed tensors leave the resident set at once and its high-water mark (VmHWM, reset through
    /proc/self/clear_refs) follows the live memory. One warm-up step of each kind runs first.
    """
    model, graph, batches = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scorer = morphir.Scorer(graph, F.cross_entropy, ("split", "prune"), registry=morphir.default_registry())
    train_step(model, opt, *batches[0])
    scorer.step(*batches[0])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size
    before = _status_kib("VmRSS")
    if kind == "train":
        train_step(model, opt, *batches[1])
    else:
        scorer.step(*batches[1])
    return _status_kib("VmHWM") - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=2, help="batches both GN and exact scoring use in (b)")
    parser.add_argument("--peak", choices=["train", "score"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak:
        print(peak_kib(args.peak))
        return 0
    model, graph, batches = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scorer = morphir.Scorer(graph, F.cross_entropy, ("split", "prune"), registry=morphir.default_registry())
    n_cands = sum(len(p[1]) for p in scorer.plans)
    x, y = batches[0]
    train_step(model, opt, x, y)
    scorer.step(x, y)  # warm-up
    t_train, t_score = [], []
    for i in range(args.repeats):  # interleaved, so machine noise hits both alike
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        train_step(model, opt, x, y)
        t1 = time.perf_counter()
        scorer.step(x, y)
        t2 = time.perf_counter()
        t_train.append(t1 - t0)
        t_score.append(t2 - t1)
    ratio = statistics.median(t_score) / statistics.median(t_train)
    print(f"(a) {n_cands} split+prune candidates over {len(graph.groups)} groups, batch 64")
    print(f"    training step {statistics.median(t_train) * 1e3:.1f} ms, scoring step "
          f"{statistics.median(t_score) * 1e3:.1f} ms: ratio {ratio:.2f} (bound 2.5)")

    data = batches[: args.batches]
    all_cands = morphir.candidates(graph, "split") + morphir.candidates(graph, "prune")
    print(f"(b) GN scoring vs exact ΔL, {args.batches} batches of 64")
    speedups = {}
    for k in (64, 256, len(all_cands)):
        chosen = random.Random(k).sample(all_cands, k)
        t0 = time.perf_counter()
        gn = morphir.Scorer(graph, F.cross_entropy, ("split", "prune"), only=chosen, registry=morphir.default_registry())
        for x, y in data:
            gn.step(x, y)
        gn.finish()
        t1 = time.perf_counter()
        morphir.exact_delta_losses(graph, chosen, data, F.cross_entropy)
        t2 = time.perf_counter()
        speedups[k] = (t2 - t1) / (t1 - t0)
        print(f"    {k:4d} candidates: GN {t1 - t0:.2f} s, exact {t2 - t1:.2f} s, speedup {speedups[k]:.0f}x")

    if os.path.exists("/proc/self/clear_refs"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}
        peaks = {}
        for kind in ("train", "score"):
            done = subprocess.run([sys.executable, __file__, "--peak", kind], capture_output=True, text=True,
                                  check=True, env=env)
            peaks[kind] = int(done.stdout.strip().splitlines()[-1])
        mem_ratio = peaks["score"] / max(peaks["train"], 1)
        print(f"(c) peak memory a step adds: training {peaks['train'] / 1024:.1f} MiB, "
              f"scoring {peaks['score'] / 1024:.1f} MiB (ratio {mem_ratio:.1f})")
    else:
        print("(c) peak memory: n/a (needs Linux /proc/self/clear_refs)")

    failures = []
    if ratio > 2.5:
        failures.append(f"scoring step / training step = {ratio:.2f} > 2.5")
    if speedups[len(all_cands)] < 50:
        failures.append(f"speedup with all candidates {speedups[len(all_cands)]:.0f}x < 50x")
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
