"""``gn``: the Gauss-Newton method (Lawton, Galstyan, Ver Steeg, arXiv 2411.05855), the default grower.

The scoring pass learns θ of every candidate of the configured morphisms (split and prune by
default) on the step's batches and estimates ΔL ≈ Δz·g + (Δz·g)²/(4L); :func:`morphir.select`
applies those with −ΔL > λ·ΔR, at most the top ``top_fraction`` of each group's positive ones.
With ``theta="random"`` θ stays at its random start (the Net2Net-style noise ablation).

The estimates are made one candidate at a time and trusted only as far as they are measured
(``verify``, on by default; on the step's held-out batches):

* a prune is a large, discrete change, where the Gauss-Newton quadratic can miss the sign: each
  selected prune is kept only if its exact loss change (one forward pass per prune) still meets
  the criterion, ΔL_exact + λ·ΔR < 0;
* many morphisms applied together interact: each moves the network in directions the
  Gauss-Newton model has no curvature for, and these add up, so the learned θ of all selected
  morphisms is scaled by the α ∈ {1, ½, ¼, ⅛, 1/16, 0} that gives the lowest real loss
  (:func:`morphir.line_search`). At α = 0 splits preserve the function exactly. Prunes that
  help one by one can hurt together: the search is also run without them, and the better of the
  two is applied.

**Where θ starts.** A split changes the function only through its activation's curvature, and
for a kinked one (ReLU) only where a copy's pre-activation crosses the kink: from a random
direction in a layer with hundreds of incoming weights almost no sample crosses, the estimate and
its gradient are exactly zero, and Adam never moves (measured on vgg19/digits: 9 of 16 channels
of a middle layer kept their random θ). With ``init="s2d"`` (the default) each split's θ starts
at the smallest eigenvector of its splitting matrix (:func:`split_init`, the direction splitting
steepest descent takes, smoothed at the kink), at half the trust radius, and the Gauss-Newton
estimate then learns θ from there; ``init="random"`` is the random start.

>>> morphir.grow(model, train, val, F.cross_entropy, method="gn", lam=1e-5)
"""

from __future__ import annotations

import dataclasses

import torch

from collections.abc import Callable, Iterable
from typing import Any

from morphir.api import (Candidate, Grower, Growth, GrowthStep, MorphGraph, MorphirError, Registry, ScoreConfig,
                     apply_in_turn, batch_loss, candidates, count_flops, exact_delta_losses, line_search, score, select)
from morphir.passes.s2d import splitting_matrices
from morphir.passes.split import Split

__all__ = ["GaussNewton", "split_init"]

INITS = ("s2d", "random")


def split_init(graph: MorphGraph, batches: Iterable[tuple[Any, Any]], loss_fn: Callable[..., torch.Tensor], *,
               trust: float = ScoreConfig().trust, registry: Registry | None = None) -> dict[Candidate, torch.Tensor]:
    """Where the scoring pass starts each split's θ: for every channel of a group splitting
    steepest descent can model (:func:`morphir.passes.s2d.splitting_matrices`) whose splitting
    matrix has a negative eigenvalue, its eigenvector of the smallest one at half the trust radius,
    ``0.5 · trust · ‖w‖ · v_min``. Other channels are left out (they start at random).

    >>> thetas = split_init(g, batches, F.cross_entropy)
    >>> cands = morphir.score(g, batches, F.cross_entropy, ("split",), init=thetas)
    """
    batches = list(batches)
    cands = candidates(graph, registry.get("split") if registry is not None else Split())
    sms = splitting_matrices(graph, batches, loss_fn, groups=list(dict.fromkeys(c.site.anchor for c in cands)))
    out: dict[Candidate, torch.Tensor] = {}
    for c in cands:
        sm = sms.get(c.site.anchor)
        i = c.site.index
        if sm is None or not float(sm.eigenvalues[i]) < 0:
            continue
        dtype = graph.incoming_weights(c.site.anchor, i).dtype
        out[c] = (0.5 * trust * float(sm.weight_norms[i]) * sm.directions[i]).to(dtype)
    return out


def _learnable(c: Candidate) -> bool:
    return getattr(c.morphism, "learnable", True)


class GaussNewton(Grower):
    """Score every candidate with the Gauss-Newton estimate; apply the best (``select``), checked
    on held-out batches unless ``verify=False``.

    >>> growth = GaussNewton(verify=False).grow(step)   # the paper's rule alone
    """

    name = "gn"
    description = "Gauss-Newton scoring of split and prune morphisms with learned θ (the paper's method)"
    preserving = True
    ROUNDS = 3  # rewrites per growth step toward a target size (up to 8 times a group's width)

    def __init__(self, verify: bool = True, init: str = "s2d"):
        if init not in INITS:
            raise MorphirError(f"GaussNewton(init=...) must be one of {', '.join(INITS)}, got {init!r}")
        self.verify = verify
        self.init = init

    def grow(self, step: GrowthStep) -> Growth:
        if step.budget is not None:
            return self._to_budget(step)
        cfg = step.config
        cands = self._score(step, step.graph)
        chosen = select(cands, step.graph, lam=cfg.lam, resource=cfg.resource, top_fraction=cfg.top_fraction,
                        confidence=cfg.confidence)
        if not (self.verify and chosen):
            return Growth(chosen=chosen, estimated_gain=-sum(c.estimate for c in chosen))
        held = step.holdout or step.batches
        info: dict[str, float | int] = {}
        chosen = self._confirm_prunes(step, chosen, held, info)
        thetas = self._scale(step, chosen, held, info) if chosen else {}
        chosen = [c for c in chosen if c in thetas]
        return Growth(chosen=chosen, thetas=thetas, estimated_gain=-sum(c.estimate for c in chosen), info=info)

    def _score(self, step: GrowthStep, graph) -> list[Candidate]:
        cfg = step.config
        score_cfg = dataclasses.replace(cfg.score, seed=step.seed % (2**31),
                                        lr=0.0 if cfg.theta == "random" else cfg.score.lr)
        init = None
        if self.init == "s2d" and cfg.theta == "learned" and "split" in cfg.morphisms:
            init = split_init(graph, step.batches, step.loss_fn, trust=score_cfg.trust, registry=step.registry)
        return score(graph, lambda: iter(step.batches), step.loss_fn, cfg.morphisms, config=score_cfg,
                     registry=step.registry, init=init)

    def _to_budget(self, step: GrowthStep) -> Growth:
        """Growth to a target size: up to ``ROUNDS`` rewrites, each scored on the graph the last one
        made, each taking the best estimates per unit added until the step's budget is spent (one
        rewrite splits a channel at most once, so one round at most doubles a group)."""
        info: dict[str, float | int] = {}
        gains: list[float] = []
        held = step.holdout or step.batches

        def size(graph) -> float:
            return float(graph.num_params() if step.budget_resource == "params" else count_flops(graph))

        start = size(step.graph)

        def one_round(graph) -> tuple[list[Candidate], dict[Candidate, torch.Tensor] | None]:
            left = float(step.budget) - (size(graph) - start)
            if left <= 0:
                return [], None
            cands = self._score(step, graph)
            chosen = select(cands, graph, lam=0.0, resource=step.budget_resource, budget=left)
            if not chosen:
                return [], None
            thetas = self._scale(dataclasses.replace(step, graph=graph), chosen, held, info) if self.verify else None
            gains.append(-sum(c.estimate for c in chosen))
            return chosen, thetas

        growth = apply_in_turn(step.graph, [one_round] * self.ROUNDS)
        growth.estimated_gain = sum(gains) if gains else None
        growth.info = {**info, "budget": step.budget, "rounds": len(gains)}
        return growth

    @staticmethod
    def _confirm_prunes(step: GrowthStep, chosen: list[Candidate], held: list, info: dict) -> list[Candidate]:
        """Keep a prune only if its exact loss change on ``held`` meets the criterion."""
        prunes = [c for c in chosen if not _learnable(c)]
        if not prunes:
            return chosen
        cfg = step.config
        exact = exact_delta_losses(step.graph, prunes, held, step.loss_fn)
        cost = (lambda c: c.delta_params) if cfg.resource == "params" else (lambda c: c.delta_flops)
        rejected = {c for c, e in zip(prunes, exact, strict=True) if e + cfg.lam * cost(c) >= 0}
        info["prunes_rejected"] = len(rejected)
        return [c for c in chosen if c not in rejected]

    @staticmethod
    def _scale(step: GrowthStep, chosen: list[Candidate], held: list, info: dict) -> dict[Candidate, torch.Tensor]:
        """θ of the step after the joint line search (with and without the prunes); the keys are
        the candidates to apply."""
        thetas = {c: c.theta for c in chosen if c.theta is not None}
        alpha, losses = line_search(step.graph, chosen, thetas, held, step.loss_fn)
        kept = [c for c in chosen if _learnable(c)]
        if len(kept) < len(chosen):  # prunes that help one by one can hurt together
            if kept:
                a2, l2 = line_search(step.graph, kept, {c: thetas[c] for c in kept}, held, step.loss_fn)
            else:
                a2, l2 = 0.0, {0.0: batch_loss(step.graph, held, step.loss_fn)}
            if l2[a2] < losses[alpha]:
                info["prunes_rejected"] = info.get("prunes_rejected", 0) + len(chosen) - len(kept)
                chosen, alpha = kept, a2
        info["theta_scale"] = alpha
        return {c: (thetas[c] * alpha if _learnable(c) else thetas[c]) for c in chosen}
