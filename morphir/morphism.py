"""The morphism contract: candidate sites, θ, an exact rewrite at θ = 0, and the local change Δz(θ).

A morphism is a class with a ``name`` and four methods::

    class Split(Morphism):
        name = "split"
        def sites(self, graph):              # where it can act (found from the channel groups)
            ...
        def theta_shape(self, graph, site):  # the shape of θ at a site
            ...
        def rewrite(self, rw, items):        # record edits for [(site, θ), ...]; return "modified"
            ...
        def local_change(self, ctx, sites, theta):  # Δz·g for the scoring pass
            ...

The engine (:func:`morphir.apply`), not the morphism, checks the contract: it verifies that the
rewrite at θ = 0 preserves the function on a probe batch and that ``modified`` is honest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from morphir.errors import MorphismError

if TYPE_CHECKING:
    from morphir.graph import MorphGraph
    from morphir.rewrite import Rewriter
    from morphir.scoring import ScoreContext

__all__ = ["Site", "Candidate", "Morphism", "Registry"]


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
    unchanged; the engine checks it on every rewrite), ``description`` (one line for listings).
    """

    name: ClassVar[str] = ""
    preserving: ClassVar[bool] = True
    description: ClassVar[str] = ""

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

    # -- scoring hooks (see morphir.scoring) -------------------------------------------------------
    learnable: ClassVar[bool] = True
    """Whether θ is learned when scoring (False: θ stays at its default, e.g. a prune)."""

    def batch_key(self, graph: MorphGraph, site: Site) -> Hashable:
        """Sites with the same key are scored together, θ stacked (default: each site alone)."""
        return site

    def init_theta(self, graph: MorphGraph, sites: Sequence[Site], trust: float, gen: torch.Generator) -> torch.Tensor:
        """Starting θ for ``sites`` stacked on dim 0, within the trust region (default: zeros)."""
        return torch.stack([self.zero_theta(graph, s) for s in sites])

    def trust_radius(self, graph: MorphGraph, sites: Sequence[Site], trust: float) -> torch.Tensor:
        """Largest norm of θ allowed per site when learning θ (default: unbounded)."""
        return torch.full((len(sites),), float("inf"))

    def alias_calls(self, graph: MorphGraph, sites: Sequence[Site]) -> Iterable[str]:
        """Call nodes whose input gradient (through that call only) ``local_change`` reads."""
        return ()

    def grad_nodes(self, graph: MorphGraph, sites: Sequence[Site]) -> Iterable[str]:
        """Nodes whose output gradient ``local_change`` reads."""
        return ()

    def site_nodes(self, graph: MorphGraph, site: Site) -> Iterable[str]:
        """Nodes that carry the site's score record: a group's producer calls, or the anchor node."""
        if site.anchor in graph.analysis.groups:
            return [p.node for p in graph.group(site.anchor).producers]
        return [site.anchor]

    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        """Δz(θ)·g per site and sample, shape ``(len(sites), N)``, differentiable in ``theta``.

        Δz is the change the morphism makes where it first appears (a consumer's input, the output
        of an anchor node) and g the per-sample loss gradient there, both read from ``ctx``; the
        scoring pass turns it into ΔL ≈ s + s²/(4L). Morphisms that cannot be scored raise
        :class:`NotImplementedError` (the message says why).
        """
        raise NotImplementedError(f"morphism {self.name!r} does not define local_change")

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


def is_zero(theta: torch.Tensor) -> bool:
    """True when every entry of θ is exactly zero."""
    return not bool(torch.any(theta != 0))
