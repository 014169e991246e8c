"""The morphism contract as executable checks: what every morphism, built-in or custom, must pass.

>>> from morphir.contract import check_morphism
>>> report = check_morphism(MyMorphism(), morphir.trace(model, x))
>>> report.sites, report.checked_alone

Checks, each raising :class:`ContractViolation` with the morphism and site:

1. sites are found, each θ has the declared shape, and candidates' costs are integers;
2. every candidate at θ = 0 preserves the output alone (all of them, or a sample per anchor)
   and all at once, and reports ``modified`` honestly (the engine verifies both);
3. θ ≠ 0 changes the output (θ is live) for preserving morphisms, wherever what the candidate acts
   on is not all zero on the probe batch (behind a dead ReLU no θ can show);
4. the default θ rewrite runs, keeps the module names of the original graph, and changes
   the parameter count by the candidate's ``delta_params`` for morphisms that claim it exactly;
5. the original graph is left untouched and ``morphir.*`` metadata does not survive a rewrite.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphir.engine import apply, candidates, output_mismatch, rewrite
from morphir.errors import MorphirError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism
from morphir.train import recalibrate_batch_norm
from morphir.verify import find_mismatch

__all__ = ["ContractViolation", "ContractReport", "check_morphism", "calibrate"]

log = logging.getLogger(__name__)


class ContractViolation(AssertionError):
    """A morphism broke its contract; the message names the morphism, the site and the numbers."""


@dataclass(frozen=True)
class ContractReport:
    """What :func:`check_morphism` checked."""

    morphism: str
    sites: int
    checked_alone: int
    checked_live: int
    all_at_once: int


def calibrate(model: torch.nn.Module, inputs: Sequence[torch.Tensor], steps: int = 4) -> torch.nn.Module:
    """Set batch-norm running statistics from ``inputs`` (as training would), then return to eval mode.

    A freshly initialised deep net in eval mode often has vanishing activations, which makes every
    θ look dead; calibrated statistics give a realistic signal to check against.

    >>> calibrate(model, (torch.randn(16, 3, 32, 32),))
    """
    recalibrate_batch_norm(model, [(tuple(inputs), None)] * steps)
    return model.eval()


def _live_theta(graph: MorphGraph, cand: Candidate, gen: torch.Generator) -> torch.Tensor:
    shape = cand.morphism.theta_shape(graph, cand.site)
    default = cand.morphism.default_theta(graph, cand.site)
    scale = float(default.abs().mean()) if default.numel() and bool(torch.any(default != 0)) else 0.0
    if scale == 0.0 and cand.site.index is not None:
        try:
            scale = float(graph.incoming_weights(cand.site.anchor, cand.site.index).abs().mean())
        except MorphirError:
            scale = 0.0
    scale = scale or 0.3
    return torch.randn(shape, generator=gen) * scale


@torch.no_grad()
def _reads_only_zeros(graph: MorphGraph, cand: Candidate) -> bool:
    """Whether what the candidate acts on is all zero on the probe batch (a dead ReLU before it), so no
    θ can show: every input of its group's producers, or the output of its anchor node."""
    if cand.site.anchor not in graph.analysis.groups:
        anchor = graph.node(cand.site.anchor)
        found: list[Any] = []

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                if n is anchor:
                    found.append(out)
                return out

        was = graph.module.training
        graph.module.eval()
        try:
            Recorder(graph.module).run(*graph.probe_inputs)
        finally:
            graph.module.train(was)
        return bool(found) and isinstance(found[0], torch.Tensor) and not bool(torch.any(found[0] != 0))
    seen: list[torch.Tensor] = []
    hooks = [graph.submodule(p.module).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for p in graph.group(cand.site.anchor).producers]
    try:
        graph.run_probe(graph.probe_inputs)
    finally:
        for h in hooks:
            h.remove()
    return bool(seen) and all(not bool(torch.any(x != 0)) for x in seen)


def _sample(cands: list[Candidate], per_anchor: int | None) -> list[Candidate]:
    if per_anchor is None:
        return cands
    by_anchor: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        by_anchor[c.site.anchor].append(c)
    out = []
    for group in by_anchor.values():
        if len(group) <= per_anchor:
            out.extend(group)
        else:
            step = (len(group) - 1) / (per_anchor - 1) if per_anchor > 1 else 0
            out.extend(group[round(i * step)] for i in range(per_anchor))
    return out


def _fail(morphism: Morphism, cand: Candidate | None, what: str) -> ContractViolation:
    where = f" at site {cand.site}" if cand is not None else ""
    return ContractViolation(f"morphism {morphism.name!r}{where}: {what}")


def check_morphism(
    morphism: Morphism,
    graph: MorphGraph,
    *,
    per_anchor: int | None = None,
    exact_params: bool = True,
    seed: int = 0,
    at_once_limit: int | None = None,
) -> ContractReport:
    """Run the whole contract for ``morphism`` on ``graph``; raise :class:`ContractViolation` on a breach.

    ``per_anchor`` checks only that many candidates per anchor (group or node) alone, evenly
    spread (None: every candidate). ``exact_params`` requires the parameter count to change by
    exactly ``delta_params`` when the default θ is applied (prune's folding may add a bias, so
    the built-in test passes False for it). ``at_once_limit`` caps the all-at-once rewrite.

    >>> check_morphism(morphir.passes.Split(), g, per_anchor=3)
    """
    gen = torch.Generator().manual_seed(seed)
    cands = candidates(graph, morphism)
    if not cands:
        raise _fail(morphism, None, "offers no candidate on this graph")
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    names = {n for n, _ in graph.module.named_modules()}
    graph.set_meta(next(iter(graph.module.graph.nodes)), "morphir.contract_probe", 1)

    for c in cands:
        shape = morphism.theta_shape(graph, c.site)
        zero = morphism.zero_theta(graph, c.site)
        if tuple(zero.shape) != tuple(shape) or bool(torch.any(zero != 0)):
            raise _fail(morphism, c, f"zero_theta has shape {tuple(zero.shape)} or nonzero entries; expected zeros {tuple(shape)}")
        if not isinstance(c.delta_params, int) or not isinstance(c.delta_flops, int):
            raise _fail(morphism, c, "delta_params and delta_flops must be integers")

    zero_theta = {c: morphism.zero_theta(graph, c.site) for c in cands}
    alone = _sample(cands, per_anchor)
    live = 0
    for c in alone:
        try:
            res = rewrite(graph, [c], {c: zero_theta[c]})  # the engine verifies preservation
        except MorphirError as exc:
            raise _fail(morphism, c, f"the θ = 0 rewrite failed: {exc}") from exc
        if morphism.preserving:
            # piecewise-linear activations hide small θ (no kink crossed), so try growing scales, and the
            # opposite sign (a new neuron whose random incoming weights a ReLU shuts off on every probe)
            theta = _live_theta(graph, c, gen)
            for scale in (1.0, 4.0, 16.0, -1.0, -16.0):
                moved = apply(graph, [c], {c: scale * theta}, verify=False)
                err, tol = output_mismatch(graph, moved)
                if err > tol or find_mismatch(graph, moved) is not None:  # a dead ReLU downstream can hide θ
                    live += 1
                    break
            else:
                if not _reads_only_zeros(graph, c):  # a group fed by a dead ReLU: no θ can show
                    raise _fail(morphism, c, f"θ ≠ 0 (|θ| up to {16 * float(theta.norm()):.3g}) left the output "
                                "unchanged: θ is dead")
        default = morphism.default_theta(graph, c.site)
        grown_res = res if torch.equal(default, zero_theta[c]) else rewrite(graph, [c], verify=False)
        grown = grown_res.graph
        if not names <= {n for n, _ in grown.module.named_modules()}:
            lost = sorted(names - {n for n, _ in grown.module.named_modules()})
            raise _fail(morphism, c, f"the rewrite dropped or renamed modules {lost[:5]}")
        change = grown.num_params() - graph.num_params()
        if not exact_params and c.delta_params and (change > 0) != (c.delta_params > 0):
            raise _fail(morphism, c, f"changed the parameter count by {change}, against delta_params={c.delta_params}")
        if exact_params and change != c.delta_params:
            raise _fail(
                morphism, c, f"changed the parameter count by {grown.num_params() - graph.num_params()}, "
                f"but its candidate says delta_params={c.delta_params}"
            )
        grown.run_probe()
        stale = grown.is_valid("morphir.contract_probe") or any(
            "morphir.contract_probe" in n.meta for n in grown.module.graph.nodes
        )
        if grown_res.modified and stale:
            raise _fail(morphism, c, "morphir.* metadata survived a rewrite that changed the graph")

    together = cands if at_once_limit is None else random.Random(seed).sample(cands, min(at_once_limit, len(cands)))
    try:
        res = rewrite(graph, together, {c: zero_theta[c] for c in together})
    except MorphirError as exc:
        raise _fail(morphism, None, f"rewriting {len(together)} candidates at once at θ = 0 failed: {exc}") from exc
    if morphism.preserving:
        # the engine's own standard, each node against its float noise: a deep net's output is
        # itself further from float64 than a fixed 1e-5·(1 + max|y|) (ResNet-50's: 6.3e-5 against 3.4e-5)
        found = find_mismatch(graph, res.graph, edited={c.site.anchor for c in together})
        if found is not None:
            raise _fail(morphism, None, f"all {len(together)} candidates at θ = 0 changed {found}")

    after = graph.module.state_dict()
    for k, v in before.items():
        if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v):
            raise _fail(morphism, None, f"the original graph's {k!r} was modified by a rewrite")
    graph.invalidate("morphir.contract_probe")
    return ContractReport(morphism.name, len(cands), len(alone), live, len(together))
