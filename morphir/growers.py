"""Growers: how a growth method decides, at a growth step, what to add to the network.

The growth loop (:func:`morphir.grow`) owns training, checkpoints and the compute budget; at every
growth step it hands a :class:`GrowthStep` (the graph with its weights frozen, a fixed set of
training batches on the CPU, the loss, the run's config) to a :class:`Grower`, which answers with a
:class:`Growth`: the candidates to apply, each with its θ. The loop applies them in one rewrite
(checked at θ = 0 by the engine) and carries the optimizer state through it.

Built-in growers live in :mod:`morphir.passes` (``gn``, ``net2net``, ``random``, ``firefly``,
``gradmax``, ``s2d``, ``mixture``); a custom one subclasses :class:`Grower`::

    class Widest(Grower):
        name = "widest"
        def grow(self, step):
            cands = [c for c in step.candidates("split") if c.site.index == 0]
            return Growth(chosen=cands)      # θ = None: the morphism's default (0 for a split)

    morphir.grow(model, train, val, F.cross_entropy, method=Widest())
"""

from __future__ import annotations

import math
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from morphir.batches import mean_loss
from morphir.engine import PassResult
from morphir.engine import candidates as all_candidates
from morphir.errors import CheckpointError, MorphirError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism, Registry, Site

if TYPE_CHECKING:
    from morphir.config import GrowConfig
    from morphir.scoring import LossFn

__all__ = ["Grower", "GrowthStep", "Growth", "log_entry", "replay_entries", "apply_in_turn", "line_search",
           "batch_loss"]


@dataclass
class GrowthStep:
    """What a grower sees at one growth step (the weights are frozen while it runs).

    ``batches``: the step's fixed training batches, on the CPU (also used for batch-norm
    recalibration); ``holdout``: further training batches, for estimates that must not be fitted on
    ``batches`` (None when the config does not ask for them); ``train``: the full training data, for
    growers that train (Firefly's short optimisation, MixtureGrowth's second network);
    ``phase``: the phase just finished (1-based); ``seed``: this step's seed. ``budget``: with a
    target size (``target_params``, ``target_flops``), how much this step should add, in
    ``budget_resource`` units (``"params"`` or ``"flops"``); None when the λ rule decides.
    """

    graph: MorphGraph
    batches: list[tuple[Any, Any]]
    holdout: list[tuple[Any, Any]] | None
    train: Iterable[tuple[Any, Any]]
    loss_fn: LossFn
    config: GrowConfig
    registry: Registry
    phase: int
    seed: int
    budget: float | None = None
    budget_resource: str = "params"

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the step (``salt`` gives independent streams).

        >>> gen = step.generator(); torch.randn(3, generator=gen)
        """
        return torch.Generator().manual_seed((self.seed * 7919 + salt) % (2**63))

    def candidates(self, morphism: str | Morphism) -> list[Candidate]:
        """Every candidate of ``morphism`` on the step's graph (from the run's registry).

        >>> splits = step.candidates("split")
        """
        return all_candidates(self.graph, morphism, registry=self.registry)

    def quota(self, group: str, positive: int | None = None) -> int:
        """How many morphisms a grower may apply to ``group`` at this step: ``top_fraction`` (rounded
        up) of its ``positive`` candidates, or of its width when a method has no ranking to count.

        >>> step.quota("features.0")   # ceil(0.3 * 16) = 5
        """
        n = self.graph.group(group).width if positive is None else positive
        return math.ceil(self.config.top_fraction * n)

    def all_batches(self) -> list[tuple[Any, Any]]:
        """``batches`` followed by ``holdout``."""
        return [*self.batches, *(self.holdout or [])]


@dataclass
class Growth:
    """A grower's answer: the candidates to apply, each with its θ (None: the morphism's default).

    ``estimated_gain``: the method's own estimate of −ΔL for the whole step (None if it has none).
    A grower that rewrites the graph by other means returns the rewrite as ``result`` and the
    entries that replay it (:meth:`Grower.replay`) as ``log``; ``chosen`` then only feeds the
    record of what was applied.
    """

    chosen: list[Candidate] = field(default_factory=list)
    thetas: Mapping[Candidate, torch.Tensor] | None = None
    estimated_gain: float | None = None
    result: PassResult | None = None
    log: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Grower(ABC):
    """Base class of a growth method: a ``name`` and :meth:`grow`.

    ``preserving``: whether the network computes the same function right after a growth step
    (a method that is not says so; the loop measures the jump in loss either way).
    ``morphisms``: morphisms the method applies, registered with the run so checkpoints replay.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    preserving: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """The grower's knobs as JSON values (default: its plain attributes), kept in checkpoints so a
        resume with other settings is refused.

        >>> GaussNewton(verify=False).settings()
        {'verify': False}
        """
        return {k: v for k, v in sorted(vars(self).items())
                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}

    def morphisms(self) -> Sequence[Morphism]:
        """Morphisms this grower applies that a default registry may lack (default: none)."""
        return ()

    def prepare(self, graph: MorphGraph, config: GrowConfig) -> MorphGraph:
        """The graph training starts from (default: ``graph``; e.g. MixtureGrowth rewrites its
        layers into template-mixing form). Must be deterministic: a resumed run calls it again.

        >>> g = grower.prepare(seed_graph, config)
        """
        return graph

    @abstractmethod
    def grow(self, step: GrowthStep) -> Growth:
        """Decide what to add at this step.

        >>> growth = grower.grow(step); [c.site for c in growth.chosen]
        """

    def finalize(self, graph: MorphGraph) -> MorphGraph:
        """The grown network to save and deploy (default: ``graph`` itself; MixtureGrowth turns its
        template-mixed layers into plain ones, which ``torch.save`` can pickle). ``graph`` is left as is.

        >>> deployable = grower.finalize(result.graph); torch.save(deployable.module, "grown.pt")
        """
        return graph

    def replay(self, graph: MorphGraph, entries: Sequence[Mapping[str, Any]], registry: Registry) -> MorphGraph:
        """Re-apply the structure of one logged growth step (weights are loaded afterwards).

        The default replays :func:`log_entry` records through the registry's morphisms.

        >>> graph = grower.replay(graph, result.log[0], registry)
        """
        return replay_entries(graph, entries, registry)

    def __repr__(self) -> str:
        return f"<grower {self.name}>"


def log_entry(c: Candidate, theta: torch.Tensor | None = None) -> dict[str, Any]:
    """The checkpoint record of an applied candidate: morphism, site and θ (θ only for morphisms
    whose θ is learned; a prune's default θ is recomputed on replay).

    >>> log_entry(cands[0])   # {'morphism': 'split', 'anchor': 'features.0', 'index': 3, ...}
    """
    learnable = getattr(c.morphism, "learnable", True)
    t = theta if theta is not None else c.theta
    kept = t.detach().clone() if (learnable and t is not None) else None
    return {"morphism": c.name, "anchor": c.site.anchor, "index": c.site.index, "variant": c.site.variant, "theta": kept}


def replay_entries(graph: MorphGraph, entries: Sequence[Mapping[str, Any]], registry: Registry) -> MorphGraph:
    """Apply logged candidates (structure only; the engine's check is skipped: weights follow).

    Entries carry an optional ``"rewrite"`` number: consecutive rewrites of one growth step (see
    :func:`apply_in_turn`) are replayed in turn.

    >>> graph = replay_entries(graph, entries, registry)
    """
    from morphir.engine import rewrite

    for _, part in itertools.groupby(entries, key=lambda e: e.get("rewrite", 0)):
        chosen: list[Candidate] = []
        thetas: dict[Candidate, torch.Tensor] = {}
        by_name: dict[str, dict[Site, Candidate]] = {}
        for e in part:
            name = e["morphism"]
            if name not in by_name:
                try:
                    by_name[name] = {c.site: c for c in all_candidates(graph, name, registry=registry)}
                except MorphirError as exc:
                    raise CheckpointError(f"the checkpoint applies {name!r}, which cannot be replayed here: {exc}") from None
            site = Site(e["anchor"], e["index"], e["variant"])
            cand = by_name[name].get(site)
            if cand is None:
                raise CheckpointError(f"the checkpoint applies {name}@{site}, which this model does not have: "
                                      "it was made from a different model")
            chosen.append(cand)
            if e.get("theta") is not None:
                thetas[cand] = e["theta"]
        graph = rewrite(graph, chosen, thetas, verify=False).graph
    return graph


def apply_in_turn(graph: MorphGraph, steps: Sequence[Callable[[MorphGraph], tuple[list[Candidate], Mapping[Candidate, torch.Tensor] | None]]]) -> Growth:
    """Several rewrites in one growth step, each chosen on the graph the previous one produced
    (e.g. widen, then deepen: a channel edit and an insertion cannot share one rewrite).

    Each step maps the current graph to ``(candidates, thetas)``; each rewrite is checked by the
    engine at θ = 0. Returns a :class:`Growth` with the final graph, the composed parameter edits
    (so optimizer state follows) and a log that :func:`replay_entries` replays.

    >>> growth = apply_in_turn(g, [lambda g: (widen(g), None), lambda g: (deepen(g), None)])
    """
    from morphir.engine import rewrite

    current, edits, entries, chosen = graph, {}, [], []
    modified = False
    for k, pick in enumerate(steps):
        cands, thetas = pick(current)
        if not cands:
            continue
        result = rewrite(current, cands, dict(thetas) if thetas is not None else None)
        for name, edit in result.param_edits.items():
            edits[name] = edits[name].then(edit) if name in edits else edit
        entries += [{**log_entry(c, (thetas or {}).get(c)), "rewrite": k} for c in cands]
        chosen += cands
        current, modified = result.graph, modified or result.modified
    if not chosen:
        return Growth()
    return Growth(chosen=chosen, result=PassResult(current, modified, tuple(chosen), edits), log=entries)


def batch_loss(graph: MorphGraph, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn) -> float:
    """The mean loss of ``graph`` over ``batches`` in eval mode (the modules' modes are restored).

    >>> batch_loss(g, step.all_batches(), F.cross_entropy)
    """
    return mean_loss(graph.module, batches, loss_fn)


def line_search(
    graph: MorphGraph,
    chosen: Sequence[Candidate],
    thetas: Mapping[Candidate, torch.Tensor],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    scales: Sequence[float] = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0),
) -> tuple[float, dict[float, float]]:
    """The scale α of the θ of learnable morphisms (splits, deepens; prunes keep their default) at
    which applying ``chosen`` all at once gives the lowest real loss on ``batches``.

    Estimates are made one candidate at a time; many applied together can interact (their changes
    add up in directions the Gauss-Newton model has no curvature for), so the joint step is
    measured. With 0 among the scales the result is never worse than the function-preserving step.
    Returns ``(best α, {α: loss})``.

    >>> alpha, losses = line_search(g, chosen, {c: c.theta for c in chosen}, held, F.cross_entropy)
    """
    from morphir.engine import rewrite

    losses: dict[float, float] = {}
    for a in scales:
        scaled = {c: (t * a if getattr(c.morphism, "learnable", True) else t) for c, t in thetas.items()}
        losses[a] = batch_loss(rewrite(graph, chosen, scaled, verify=False).graph, batches, loss_fn)
    best = min(losses, key=lambda a: (losses[a], -a))
    return best, losses
