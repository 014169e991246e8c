"""How well the Gauss-Newton estimate ranks split candidates against their exact loss change.

For the `vgg19` zoo seed and the residual `resnet20` seed, trained on digits: score every split
candidate (θ learned), then build one expanded network per candidate of the first, a middle and
the last growable group and measure its exact ΔL on the same batches the estimate used. Prints the
Spearman rank correlation per group and the share of candidates predicted to help (estimate < 0)
that really help (exact ΔL < 0), for the per-sample and the whole-batch estimate side by side.

Exits non-zero unless, for the default estimate, the median Spearman ≥ 0.85, no group is below
0.6, and the share is ≥ 0.8.

θ starts where the ``gn`` grower starts it (``--init s2d``: splitting steepest descent's
directions; ``--init random``: a random direction).

    python tools/bench_fidelity.py [--epochs 6] [--batches 8] [--seed 0] [--init s2d|random]
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
from morphir.data import digits_loaders
from morphir.passes.gn import INITS, split_init
from morphir.scoring import spearman
from morphir.train import evaluate, fit

MODELS = ("vgg19", "resnet20")


def measure(model_name: str, args: argparse.Namespace, per_sample: bool, trained: dict) -> list[dict]:
    if model_name not in trained:
        torch.manual_seed(args.seed)
        train, val = digits_loaders(seed=args.seed, batch_size=64)
        model = morphir.zoo.build(model_name, (1, 8, 8), 10)
        fit(model, train, F.cross_entropy, epochs=args.epochs)
        acc = evaluate(model, val, F.cross_entropy)[1]
        batches = [b for _, b in zip(range(args.batches), train)]
        trained[model_name] = (morphir.trace(model, torch.zeros(1, 1, 8, 8)), batches, acc)
    graph, batches, acc = trained[model_name]
    cfg = morphir.ScoreConfig(per_sample=per_sample, seed=args.seed, epochs=args.score_epochs, curvature=args.curvature)
    # θ starts where the gn grower starts it (init="s2d": splitting steepest descent's directions)
    init = split_init(graph, batches, F.cross_entropy, trust=cfg.trust) if args.init == "s2d" else None
    cands = morphir.score(graph, batches, F.cross_entropy, morphisms=("split",), config=cfg, init=init)
    groups = list(dict.fromkeys(c.site.anchor for c in cands))
    chosen = list(dict.fromkeys([groups[0], groups[len(groups) // 2], groups[-1]]))
    rows = []
    for name in chosen:
        sel = [c for c in cands if c.site.anchor == name]
        exact = morphir.exact_delta_losses(graph, sel, batches, F.cross_entropy)
        est = [c.estimate for c in sel]
        helped = [e for e, x in zip(est, exact) if e < 0]
        share = sum(1 for e, x in zip(est, exact) if e < 0 and x < 0) / len(helped) if helped else float("nan")
        rows.append({"model": model_name, "acc": acc, "group": name, "n": len(sel), "spearman": spearman(est, exact),
                     "predicted": len(helped), "share": share})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs before scoring")
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 used to score and to measure")
    parser.add_argument("--score-epochs", type=int, default=3, help="passes over those batches while learning θ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default="s2d", choices=INITS, help="where θ starts (default: the gn grower's)")
    parser.add_argument("--curvature", default=morphir.ScoreConfig().curvature, choices=morphir.scoring.CURVATURES,
                        help="the estimate's second-order term (default: the scoring pass's)")
    args = parser.parse_args(argv)
    start = time.time()
    trained: dict = {}
    results = {}
    for per_sample in (True, False):
        rows = [r for m in MODELS for r in measure(m, args, per_sample, trained)]
        results[per_sample] = rows
    default = morphir.ScoreConfig().per_sample
    print(f"{'model':9} {'val acc':>7} {'group':20} {'n':>3}  {'spearman per-sample':>19} {'whole-batch':>11}  "
          f"{'helps/predicted (per-sample)':>28}")
    for a, b in zip(results[True], results[False]):
        print(f"{a['model']:9} {a['acc']:7.3f} {a['group']:20} {a['n']:3d}  {a['spearman']:19.3f} {b['spearman']:11.3f}  "
              f"{a['share']:.3f} of {a['predicted']}")
    failures = []
    for per_sample, rows in results.items():
        spears = [r["spearman"] for r in rows]
        helped = sum(r["predicted"] for r in rows)
        share = sum(r["share"] * r["predicted"] for r in rows if r["predicted"]) / helped if helped else float("nan")
        label = "per-sample" if per_sample else "whole-batch"
        print(f"{label:11}: median spearman {statistics.median(spears):.3f}, min {min(spears):.3f}, "
              f"share that helps {share:.3f}" + ("   (default)" if per_sample == default else ""))
        if per_sample == default:
            if statistics.median(spears) < 0.85:
                failures.append(f"median Spearman {statistics.median(spears):.3f} < 0.85")
            if min(spears) < 0.6:
                failures.append(f"a group has Spearman {min(spears):.3f} < 0.6")
            if not share >= 0.8:
                failures.append(f"share of predicted helpers that help {share:.3f} < 0.8")
    print(f"{time.time() - start:.0f} s")
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
