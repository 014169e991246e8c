"""The built-ins, assembled: the core takes its morphisms and growers as arguments, and this module
supplies those of :mod:`morphir.passes` to the functions users call on ``morphir`` itself.

Each function here is the core function of the same name with ``registry`` (and ``growers``)
defaulting to the built-ins; anything given explicitly is passed through unchanged.

>>> morphir.candidates(g, "split")              # = morphir.api.candidates(g, "split", registry=default_registry())
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from morphir import engine, loop, scoring
from morphir.api import Candidate, Grower, GrowResult, MorphGraph, Morphism, Registry
from morphir.passes import builtin_growers, builtin_morphisms

__all__ = ["Scorer", "candidates", "default_registry", "grow", "morphisms", "resolve_grower", "score"]


def default_registry() -> Registry:
    """A new registry holding the built-in morphisms (``split``, ``prune``, ``deepen``, ``add_channel``).

    Each call returns a fresh object: registering into it changes nothing global.

    >>> morphir.default_registry().names()
    ['split', 'prune', 'deepen', 'add_channel']
    """
    return Registry(builtin_morphisms())


def morphisms(registry: Registry | None = None) -> list[str]:
    """Names of the morphisms in ``registry`` (the built-ins when None).

    >>> morphir.morphisms()
    ['split', 'prune', 'deepen', 'add_channel']
    """
    return (registry if registry is not None else default_registry()).names()


def candidates(graph: MorphGraph, morphism: str | Morphism, *, registry: Registry | None = None) -> list[Candidate]:
    """Every candidate of ``morphism`` (a name or a Morphism instance) on ``graph``; names are
    looked up among the built-ins unless ``registry`` is given.

    >>> cands = morphir.candidates(g, "split")
    >>> cands[0].site, cands[0].delta_params
    """
    return engine.candidates(graph, morphism, registry=registry if registry is not None else default_registry())


def score(graph: MorphGraph, batches: Any, loss_fn: Any, morphisms: Any = ("split", "prune"), *,
          registry: Registry | None = None, **options: Any) -> list[Candidate]:
    """:func:`morphir.api.score` with names looked up among the built-ins unless ``registry`` is given.

    >>> cands = morphir.score(g, lambda: train_loader, F.cross_entropy, config=morphir.ScoreConfig(epochs=2))
    """
    return scoring.score(graph, batches, loss_fn, morphisms,
                         registry=registry if registry is not None else default_registry(), **options)


class Scorer(scoring.Scorer):
    """:class:`morphir.api.Scorer` with names looked up among the built-ins unless ``registry`` is given.

    >>> scorer = morphir.Scorer(g, F.cross_entropy, ("split",))
    >>> for x, y in loader: scorer.step(x, y)
    >>> cands = scorer.finish()
    """

    def __init__(self, graph: MorphGraph, loss_fn: Any, morphisms: Any = ("split", "prune"), *,
                 registry: Registry | None = None, **options: Any):
        super().__init__(graph, loss_fn, morphisms, registry=registry if registry is not None else default_registry(),
                         **options)


def resolve_grower(method: str | Grower, growers: Mapping[str, Grower] | None = None) -> Grower:
    """The grower called ``method``, among the built-ins unless ``growers`` is given (a
    :class:`Grower` instance is returned as is).

    >>> morphir.resolve_grower("net2net")
    <grower net2net>
    """
    return loop.resolve_grower(method, growers if growers is not None else builtin_growers())


def grow(model: Any, train: Any, val: Any, loss_fn: Any, *, registry: Registry | None = None,
         growers: Mapping[str, Grower] | None = None, **options: Any) -> GrowResult:
    """:func:`morphir.api.grow` with the built-in morphisms and growth methods unless ``registry``
    or ``growers`` is given (``method="gn"`` and the other names of :func:`morphir.passes.builtin_growers`).

    >>> res = morphir.grow(model, train, val, F.cross_entropy, phases=3, phase_epochs=2, run_dir="run")
    """
    return loop.grow(model, train, val, loss_fn, registry=registry if registry is not None else default_registry(),
                     growers=growers if growers is not None else builtin_growers(), **options)
