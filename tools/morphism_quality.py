"""How much of the achievable loss decrease does each way of choosing a split's θ reach? (Appendix C)

For every split candidate (channel) of one layer (default: the middle growable group of the vgg19
seed trained briefly on digits), θ is chosen three ways on the same training batches:

1. ``gn``: learned on the Gauss-Newton estimate (``morphir.score(..., morphisms=("split",))``, the
   default ``ScoreConfig`` as in the growth loop, ``--score-epochs`` passes: trust region
   ``trust`` × ‖w‖);
2. ``s2d``: splitting steepest descent, the min eigenvector of the splitting matrix with ε from a
   line search on the real loss (``morphir.passes.s2d``, the grid ends at the same trust radius);
3. ``direct``: θ optimised by Adam (``--steps``) on the real loss of the expanded network (the
   split applied, its producer rows w ± θ a function of a trainable θ), projected onto the same
   trust region; started from a random direction at half the radius (as ``gn`` starts), from
   gn's θ and from s2d's θ, keeping the one with the lowest final training loss: the reference
   optimum.

The *true* decrease −ΔL of each θ is then measured exactly (``morphir.exact_delta_losses``, one
expanded network per channel) on held-out batches (the validation split). Prints one row per
channel and a summary (the mean true decrease of each method and the share of the direct
optimum that gn and s2d reach); writes a bar chart. States no bound: exits 0 unless it fails.

    python tools/morphism_quality.py [--group features.11.0] [--epochs 3] [--seed 0] [--steps 300]
                                     [--score-epochs 1] [--out morphism_quality.png] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call, vmap

import morphir
from morphir.data import digits_loaders
from morphir.passes.gn import INITS, split_init
from morphir.passes.s2d import DEFAULT_GRID, split_line_search, splitting_matrices
from morphir.passes.split import Split
from morphir.train import fit

__all__ = ["Cell", "Row", "direct_thetas", "layers_of", "main", "measure", "measure_all", "plot", "summary", "table",
           "verdict"]

METHODS = ("gn", "s2d", "direct")


@dataclass
class Row:
    """One channel: the true decrease −ΔL (held out) of each method's θ, and what each method saw.

    >>> Row(3, -0.2, 0.01, 0.05, {"gn": 0.01, "s2d": 0.008, "direct": 0.012}, {...}).decrease["gn"]
    """

    channel: int
    eigenvalue: float  # λ_min of the splitting matrix
    gn_estimate: float  # −ΔL the GN estimate predicts for its θ
    s2d_eps: float  # the line search's ε (relative to ‖w‖)
    decrease: dict[str, float]
    radius: dict[str, float]  # ‖θ‖ / ‖w‖ of each method


# -- direct optimisation of θ on the real loss ---------------------------------------------------------
def _suffix(gm: fx.GraphModule, starts: Sequence[str]) -> tuple[fx.GraphModule, list[str]]:
    """The part of ``gm`` that depends on the nodes ``starts``, as a module whose inputs are the
    values it reads from the rest (returned by name): only that part is rerun while θ is learned."""
    nodes = list(gm.graph.nodes)
    cone = set(starts)
    for n in nodes:
        if any(a.name in cone for a in n.all_input_nodes):
            cone.add(n.name)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []
    for n in nodes:
        if n.name in cone and n.op != "output":
            for a in n.all_input_nodes:
                if a not in env:
                    if a.op == "get_attr":
                        env[a] = new.node_copy(a, lambda x: env[x])
                    else:
                        env[a] = new.placeholder(f"in_{a.name}")
                        inputs.append(a.name)
            env[n] = new.node_copy(n, lambda x: env[x])
        elif n.op == "output":
            new.output(fx.node.map_arg(n.args[0], lambda x: env[x]))
    return fx.GraphModule(gm, new), inputs


class _Keep(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out.detach().clone()
        return out


def _copy_rows(graph: morphir.MorphGraph, cands: Sequence[morphir.Candidate]) -> tuple[morphir.MorphGraph, dict[str, torch.Tensor]]:
    """Every candidate split at θ = 0, and per producer module the rows of each candidate's +θ and −θ
    copies, shape (2, candidates) (found by splitting at θ = k + 1 for the k-th candidate)."""
    zero = morphir.apply(graph, cands, None, verify=False)
    shape = graph.incoming_numel(cands[0].site.anchor)
    marked = morphir.apply(graph, cands, {c: torch.full((shape,), float(k + 1)) for k, c in enumerate(cands)},
                           verify=False)
    rows = {}
    for module, _ in graph.incoming_shapes(cands[0].site.anchor):
        w0 = zero.submodule(module).weight.detach()
        key = (marked.submodule(module).weight.detach() - w0).reshape(w0.shape[0], -1)[:, 0].round()
        rows[module] = torch.tensor([[int((key == sign * (k + 1)).nonzero()[0, 0]) for k in range(len(cands))]
                                     for sign in (1, -1)])
    return zero, rows


def direct_thetas(graph: morphir.MorphGraph, cands: Sequence[morphir.Candidate], batches: Sequence[tuple[Any, Any]],
                  loss_fn: Any, *, trust: float, steps: int, starts: Sequence[Mapping[morphir.Candidate, torch.Tensor]] = (),
                  lr: float = 0.2, seed: int = 0) -> dict[morphir.Candidate, torch.Tensor]:
    """θ of each split candidate (all of one group), learned by Adam on the real loss of the expanded
    network over ``batches`` (one per step, cycled; eval mode), kept within ``trust`` × ‖w‖.

    Each candidate is optimised from a random direction at half the radius (as ``gn`` starts) and
    from each of ``starts`` (e.g. other methods' θ); the θ with the lowest final loss on ``batches``
    is returned. All candidates and starts run as one batched (vmap) network in which every
    candidate is split, at θ = 0 except the one optimised: the same function as that split alone.
    ``lr`` is the first Adam step's length relative to the radius.

    >>> thetas = direct_thetas(g, cands, batches, F.cross_entropy, trust=0.3, steps=300)
    """
    group = cands[0].site.anchor
    if any(c.site.anchor != group for c in cands):
        raise morphir.MorphirError("direct_thetas optimises the candidates of one group at a time")
    k_cands = len(cands)
    w = torch.stack([graph.incoming_weights(group, c.site.index) for c in cands])
    radius = trust * w.norm(dim=1)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(w.shape, generator=gen)
    phis = [0.5 * noise / noise.norm(dim=1, keepdim=True)]
    for start in starts:
        phi = torch.stack([start[c].reshape(-1).to(w) for c in cands]) / radius[:, None]
        phis.append(phi / phi.norm(dim=1, keepdim=True).clamp_min(1.0))
    phi = torch.cat(phis).clone().requires_grad_()  # variant v: start v // K, candidate v % K
    n_var = phi.shape[0]
    rad = radius.repeat(len(phis))

    zero, rows = _copy_rows(graph, cands)
    gm = zero.module.eval()
    sub, inputs = _suffix(gm, [p.node for p in zero.group(group).producers])
    cached = []
    for x, y in batches:
        rec = _Keep(gm, set(inputs))
        with torch.no_grad():
            rec.run(*(x if isinstance(x, tuple) else (x,)))
        cached.append((tuple(rec.values[n] for n in inputs), y))
    shapes = dict(graph.incoming_shapes(group))
    base = {m: zero.submodule(m).weight.detach() for m in rows}
    index = torch.arange(n_var)

    def weights(phi: torch.Tensor) -> dict[str, torch.Tensor]:
        theta = phi * rad[:, None]
        out, offset = {}, 0
        for m, (plus, minus) in rows.items():
            n = int(torch.Size(shapes[m]).numel())
            t = theta[:, offset : offset + n]
            offset += n
            delta = torch.zeros(n_var, base[m].shape[0], n, dtype=t.dtype)
            delta = delta.index_put((index, plus.repeat(len(phis))), t).index_put((index, minus.repeat(len(phis))), -t)
            out[f"{m}.weight"] = base[m] + delta.reshape(n_var, *base[m].shape)
        return out

    def losses(params: dict[str, torch.Tensor], values: tuple[torch.Tensor, ...], y: Any) -> torch.Tensor:
        return vmap(lambda p: loss_fn(functional_call(sub, p, values), y))(params)

    step0 = lr / math.sqrt(w.shape[1])  # Adam's first step is ≈ lr per coordinate: lr·radius in norm
    opt = torch.optim.Adam([phi], lr=step0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for k in range(steps):
        values, y = cached[k % len(cached)]
        loss = losses(weights(phi), values, y).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            phi.div_(phi.norm(dim=1, keepdim=True).clamp_min(1.0))
    with torch.no_grad():
        params = weights(phi)
        final = sum(losses(params, values, y) * len(y) for values, y in cached)
        best = final.reshape(len(phis), k_cands).argmin(dim=0)
        chosen = phi.reshape(len(phis), k_cands, -1)[best, torch.arange(k_cands)]
    return {c: (radius[j] * chosen[j]).to(w.dtype) for j, c in enumerate(cands)}


# -- the measurement -----------------------------------------------------------------------------------
def _with_theta(c: morphir.Candidate, theta: torch.Tensor) -> morphir.Candidate:
    return morphir.Candidate(c.morphism, c.site, c.delta_params, c.delta_flops, theta=theta)


@dataclass
class Cell:
    """One layer of one net: its channels' rows."""

    model: str
    group: str
    rows: list[Row]


def _prepare(args: argparse.Namespace, model_name: str) -> tuple[morphir.MorphGraph, list, list]:
    torch.manual_seed(args.seed)
    train, val = digits_loaders(seed=args.seed, batch_size=64)
    model = morphir.zoo.build(model_name, (1, 8, 8), 10)
    if args.epochs:
        fit(model, train, F.cross_entropy, epochs=args.epochs)
    graph = morphir.trace(model.eval(), torch.zeros(1, 1, 8, 8))
    batches = [b for _, b in zip(range(args.batches), train)]
    morphir.recalibrate_batch_norm(graph.module, batches)  # as the growth loop does before a step
    return graph, batches, list(val)


def layers_of(graph: morphir.MorphGraph, count: int) -> list[str]:
    """``count`` split groups spread over the depth: at 1/(count+1), 2/(count+1), ... of the
    growable nonlinear groups (one layer: the middle one).

    >>> layers_of(g, 2)
    ['features.8.0', 'features.17.0']
    """
    groups = [grp.name for grp in graph.groups if grp.growable and grp.nonlinear]
    picks = [groups[min(len(groups) - 1, (k + 1) * len(groups) // (count + 1))] for k in range(count)]
    return list(dict.fromkeys(picks))


def measure(args: argparse.Namespace, model_name: str = "vgg19", group: str | None = None) -> tuple[str, list[Row]]:
    """Train the seed, choose θ three ways for the channels of one group, measure each exactly.

    >>> group, rows = measure(parse_args(["--quick"]), "vgg19", "features.11.0")
    """
    graph, batches, held = _prepare(args, model_name)
    config = morphir.ScoreConfig(seed=args.seed, epochs=args.score_epochs, curvature=args.curvature)
    # plain copies, whose rows _copy_rows finds by their θ; fresh norms would only rescale the copies
    # behind their batch norm, the same function
    init = split_init(graph, batches, F.cross_entropy, trust=config.trust) if args.init == "s2d" else None
    scored = morphir.score(graph, batches, F.cross_entropy, morphisms=(Split(fresh_norm=None),), config=config,
                           init=init)
    groups = list(dict.fromkeys(c.site.anchor for c in scored))
    group = group or layers_of(graph, 1)[0]
    if group not in groups:
        raise morphir.MorphirError(f"no split candidates in group {group!r} of {model_name}; groups: {', '.join(groups)}")
    cands = [c for c in scored if c.site.anchor == group][: args.channels or None]

    sm = splitting_matrices(graph, batches, F.cross_entropy, groups=[group])[group]
    s2d, eps = {}, {}
    for c in cands:
        i = c.site.index
        direction = (sm.weight_norms[i] * sm.directions[i]).float()
        ls = split_line_search(graph, [c], {c: direction}, batches, F.cross_entropy, grid=DEFAULT_GRID)
        s2d[c], eps[c] = ls.eps * direction, ls.eps
    gn = {c: c.theta for c in cands}
    direct = direct_thetas(graph, cands, batches, F.cross_entropy, trust=config.trust, steps=args.steps,
                           starts=[gn, s2d], seed=args.seed)
    thetas = {"gn": gn, "s2d": s2d, "direct": direct}
    exact = {m: morphir.exact_delta_losses(graph, [_with_theta(c, thetas[m][c]) for c in cands], held,
                                           F.cross_entropy) for m in METHODS}
    rows = []
    for j, c in enumerate(cands):
        w = float(graph.incoming_weights(group, c.site.index).norm())
        rows.append(Row(c.site.index, float(sm.eigenvalues[c.site.index]), -float(c.estimate), eps[c],
                        {m: -exact[m][j] for m in METHODS},
                        {m: float(thetas[m][c].norm()) / max(w, 1e-12) for m in METHODS}))
    return group, rows


def measure_all(args: argparse.Namespace) -> list[Cell]:
    """Every (net, layer) cell of the run: ``--models``, ``--layers`` each (or ``--group``).

    >>> cells = measure_all(parse_args(["--quick"]))
    """
    cells = []
    for model_name in args.models:
        if args.group:
            groups = [args.group]
        else:
            graph, _, _ = _prepare(argparse.Namespace(**{**vars(args), "epochs": 0}), model_name)
            groups = layers_of(graph, args.layers)
        for group in groups:
            cells.append(Cell(model_name, *measure(args, model_name, group)))
    return cells


def table(rows: Sequence[Row]) -> list[str]:
    """The per-channel lines of the printed table (header first).

    >>> print("\\n".join(table(rows)))
    """
    lines = [f"{'ch':>3} {'λ_min':>9} {'gn est':>8} {'s2d ε':>6}  "
             + "  ".join(f"{'−ΔL ' + m:>11} {'‖θ‖/‖w‖':>7}" for m in METHODS)]
    for r in rows:
        lines.append(f"{r.channel:3d} {r.eigenvalue:9.3g} {r.gn_estimate:8.4f} {r.s2d_eps:6.3f}  "
                     + "  ".join(f"{r.decrease[m]:11.5f} {r.radius[m]:7.3f}" for m in METHODS))
    return lines


def summary(rows: Sequence[Row]) -> dict[str, float]:
    """Mean true decrease of each method, and the share of the direct optimum (sum over channels)
    that gn and s2d reach.

    >>> summary(rows)["gn_share"]
    """
    out = {m: sum(r.decrease[m] for r in rows) / max(len(rows), 1) for m in METHODS}
    best = sum(r.decrease["direct"] for r in rows)
    for m in ("gn", "s2d"):
        out[f"{m}_share"] = sum(r.decrease[m] for r in rows) / best if best > 0 else float("nan")
    return out


def plot(cells: Sequence[Cell], out: str | Path) -> Any:
    """Grouped bars, one panel per (net, layer): per channel, the true decrease of each method;
    saved to ``out``; returns the figure.

    >>> fig = plot(cells, "morphism_quality.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(c.rows) for c in cells)
    fig, axes = plt.subplots(len(cells), 1, figsize=(max(6.0, 0.45 * widest + 2), 3.0 * len(cells)), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, cell in zip(axes[:, 0], cells):
        for k, m in enumerate(METHODS):
            xs = [j + (k - (len(METHODS) - 1) / 2) * width for j in range(len(cell.rows))]
            ax.bar(xs, [r.decrease[m] for r in cell.rows], width, label=m)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(cell.rows)), [str(r.channel) for r in cell.rows])
        ax.set_xlabel(f"channel of {cell.group} ({cell.model})")
        ax.set_ylabel("true −ΔL (held out)")
        ax.legend()
    axes[0, 0].set_title("θ of each split: gn, s2d, direct optimisation")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


def verdict(cells: Sequence[Cell]) -> tuple[dict[str, float], list[str]]:
    """The median over cells of each method's mean true decrease, and the bounds it misses: gn at
    least s2d's, and at least half of direct optimisation's.

    >>> medians, misses = verdict(cells)
    """
    medians = {m: statistics.median(summary(c.rows)[m] for c in cells) for m in METHODS}
    misses = []
    if medians["gn"] < medians["s2d"]:
        misses.append(f"gn's median decrease {medians['gn']:.5f} is below s2d's {medians['s2d']:.5f}")
    if medians["gn"] < 0.5 * medians["direct"]:
        misses.append(f"gn's median decrease {medians['gn']:.5f} is below half of direct's {medians['direct']:.5f}")
    return medians, misses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick``: vgg19 only, 1 epoch, one layer, 4 channels, 4 batches, 60 Adam steps).

    >>> parse_args(["--quick"]).channels
    4
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,resnet20", help="comma-separated zoo nets (default: a plain and a residual one)")
    parser.add_argument("--layers", type=int, default=2, help="layers per net, spread over its depth")
    parser.add_argument("--group", default=None, help="measure only this group (of every net that has it)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the seed before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8, help="training batches of 64 that θ is chosen on")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the direct optimisation")
    parser.add_argument("--score-epochs", type=int, default=morphir.ScoreConfig().epochs,
                        help="passes over the batches while gn learns θ (default: the growth loop's)")
    parser.add_argument("--curvature", default=morphir.ScoreConfig().curvature, choices=morphir.scoring.CURVATURES,
                        help="gn's second-order term (default: the scoring pass's)")
    parser.add_argument("--init", default="s2d", choices=INITS,
                        help="where gn's θ starts (default: the gn grower's, s2d's direction)")
    parser.add_argument("--channels", type=int, default=16, help="only the first N channels of each layer (0: all)")
    parser.add_argument("--out", default="morphism_quality.png", help="the bar chart (PNG)")
    parser.add_argument("--quick", action="store_true", help="a small run (vgg19, one layer, 1 epoch, 4 channels, "
                                                             "4 batches, 60 steps)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.quick:
        args.models, args.layers = args.models[:1], 1
        args.epochs, args.channels, args.batches, args.steps = 1, 4, 4, 60
    if not args.models or args.layers < 1:
        parser.error("--models needs at least one net and --layers at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print the tables, the summaries and the verdict, write the chart; 0 when
    gn meets both bounds (see :func:`verdict`), 1 otherwise.

    >>> main(["--quick", "--out", "/tmp/quality.png"])
    """
    args = parse_args(argv)
    start = time.time()
    try:
        cells = measure_all(args)
    except morphir.MorphirError as exc:
        print(f"error: {exc}")
        return 2
    print(f"digits, {args.epochs} epochs of training, θ chosen on {args.batches} training batches "
          f"(gn: {args.curvature} curvature, {args.init} start), true −ΔL on the validation split")
    for cell in cells:
        print(f"\n{cell.model} {cell.group}")
        print("\n".join(table(cell.rows)))
        s = summary(cell.rows)
        print(f"mean true decrease: gn {s['gn']:.5f}, s2d {s['s2d']:.5f}, direct {s['direct']:.5f}; "
              f"share of the direct optimum reached: gn {s['gn_share']:.0%}, s2d {s['s2d_share']:.0%}"
              + ("" if all(math.isfinite(s[k]) for k in ("gn_share", "s2d_share")) else " (direct found no decrease)"))
    plot(cells, args.out)
    medians, misses = verdict(cells)
    print(f"\nmedian over {len(cells)} layers of the mean true decrease: "
          + ", ".join(f"{m} {v:.5f}" for m, v in medians.items()))
    for line in misses:
        print(f"MISS {line}")
    print("gn at least s2d and at least half of direct: " + ("ok" if not misses else "missed"))
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
