"""The morphism contract: candidate sites, θ, and an exact rewrite at θ = 0.

A morphism is a class with a ``name`` and three methods::

    class Split(Morphism):
        name = "split"
        def sites(self, graph):              # where it can act (found from the channel groups)
            ...
        def theta_shape(self, graph, site):  # the shape of θ at a site
            ...
        def rewrite(self, rw, items):        # record edits for [(site, θ), ...]; return "modified"
            ...

A morphism the Gauss-Newton pass can estimate also implements the scoring protocol,
:class:`morphir.ScoredMorphism` (its local change Δz·g), which the scoring module owns.

The engine (:func:`morphir.apply`), not the morphism, checks the contract: it verifies that the
rewrite at θ = 0 preserves the function on a probe batch and that ``modified`` is honest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from morphir.errors import MorphismError

if TYPE_CHECKING:
    from morphir.graph import MorphGraph
    from morphir.rewriter import Rewriter

__all__ = ["Candidate", "Morphism", "Registry", "Site", "resolve"]


@dataclass(frozen=True, order=True)
class Site:
    """Where a morphism acts: ``anchor`` is a group name (channel morphisms) or a node name.

    ``index`` is the channel within the group; ``variant`` distinguishes kinds at one anchor.

    >>> Site("features.0", 3)          # channel 3 of group features.0
    >>> Site("relu_2", variant="residual")
    """

    anchor: str
    index: int | None = None
    variant: str | None = None

    def __str__(self) -> str:
        text = self.anchor
        if self.index is not None:
            text += f"[{self.index}]"
        if self.variant is not None:
            text += f":{self.variant}"
        return text


@dataclass(eq=False)
class Candidate:
    """One morphism at one site, with what scoring learns about it.

    Equality and hashing use ``(morphism name, site)`` only, so candidates key θ mappings.
    ``theta`` is the learned θ (None until scored), ``estimate`` the estimated loss change.
    """

    morphism: Morphism
    site: Site
    delta_params: int = 0
    delta_flops: int = 0
    theta: torch.Tensor | None = None
    estimate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The morphism's name."""
        return self.morphism.name

    @property
    def key(self) -> tuple[str, Site]:
        """``(morphism name, site)``: what identifies the candidate."""
        return (self.morphism.name, self.site)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        est = "" if self.estimate is None else f", estimate={self.estimate:.4g}"
        return f"Candidate({self.name}@{self.site}, Δparams={self.delta_params:+d}{est})"


class Morphism(ABC):
    """Base class of every morphism, built-in or custom.

    Class attributes: ``name`` (unique), ``preserving`` (the rewrite at θ = 0 leaves the function
    unchanged; the engine checks it on every rewrite), ``description`` (one line for listings),
    ``removes_channel`` (it deletes its site's channel; selection never empties a group).
    """

    name: ClassVar[str] = ""
    preserving: ClassVar[bool] = True
    description: ClassVar[str] = ""
    removes_channel: ClassVar[bool] = False
    """The morphism removes its site's channel (a prune): selection never applies so many to one
    group that it would be left without channels."""

    @abstractmethod
    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        """Every site where the morphism can act on ``graph``."""

    @abstractmethod
    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        """Shape of θ at ``site``."""

    @abstractmethod
    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        """Record the edits for every ``(site, θ)`` in ``rw``; return whether anything changes.

        All sites of one rewrite arrive together, so the cost stays linear in their number.
        """

    def zero_theta(self, graph: MorphGraph, site: Site) -> torch.Tensor:
        """θ = 0 at ``site``: the point where the rewrite must preserve the function."""
        return torch.zeros(self.theta_shape(graph, site))

    def default_theta(self, graph: MorphGraph, site: Site) -> torch.Tensor:
        """θ used when :func:`morphir.apply` gets ``theta=None`` (θ = 0 unless overridden)."""
        return self.zero_theta(graph, site)

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        """``(Δparams, ΔFLOPs per sample)`` of applying the morphism at ``site``."""
        return (0, 0)

    def candidates(self, graph: MorphGraph) -> list[Candidate]:
        """A :class:`Candidate` for every site, with its parameter and FLOP cost.

        >>> morphir.passes.Split().candidates(g)[:2]
        """
        out = []
        for site in self.sites(graph):
            dp, df = self.cost(graph, site)
            out.append(Candidate(self, site, delta_params=dp, delta_flops=df))
        return out

    def __repr__(self) -> str:
        return f"<morphism {self.name}>"


class Registry:
    """Morphisms by name. Owned by whoever makes it; nothing global is mutated.

    >>> reg = morphir.default_registry().register(MyMorphism())
    >>> morphir.candidates(g, "mine", registry=reg)
    """

    def __init__(self, morphisms: Iterable[Morphism] = ()):
        self._items: dict[str, Morphism] = {}
        for m in morphisms:
            self.register(m)

    def register(self, morphism: Morphism) -> Registry:
        """Add ``morphism`` (its name must be new); returns the registry for chaining."""
        if not isinstance(morphism, Morphism):
            raise MorphismError(f"register expects a Morphism instance, got {type(morphism).__name__}")
        if not morphism.name:
            raise MorphismError(f"{type(morphism).__name__} has no name; set the class attribute `name`")
        if morphism.name in self._items:
            raise MorphismError(f"a morphism named {morphism.name!r} is already registered")
        self._items[morphism.name] = morphism
        return self

    def get(self, name: str | Morphism) -> Morphism:
        """The morphism called ``name`` (a Morphism instance is returned as is)."""
        if isinstance(name, Morphism):
            return name
        try:
            return self._items[name]
        except KeyError:
            raise MorphismError(f"unknown morphism {name!r}; registered: {', '.join(self._items)}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __iter__(self) -> Iterator[Morphism]:
        return iter(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


def resolve(spec: str | Morphism, registry: Registry | None) -> Morphism:
    """The morphism ``spec`` names in ``registry`` (a Morphism instance is returned as is).

    >>> resolve("split", morphir.default_registry())
    <morphism split>
    """
    if isinstance(spec, Morphism):
        return spec
    if registry is None:
        raise MorphismError(f"the morphism {spec!r} is given by name but no registry was given to look it up in: "
                            "pass registry=morphir.default_registry() (or your own), or the Morphism itself")
    return registry.get(spec)


def is_zero(theta: torch.Tensor) -> bool:
    """True when every entry of θ is exactly zero."""
    return not bool(torch.any(theta != 0))
