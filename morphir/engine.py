"""The engine: find candidates, apply morphisms, and check the contract on every rewrite.

>>> g = morphir.trace(model, x)
>>> cands = morphir.candidates(g, "split")
>>> g2 = morphir.apply(g, cands)                # θ = 0: verified to preserve the function
>>> g3 = morphir.apply(g, cands[:3], theta={c: 0.1 * torch.randn(c.morphism.theta_shape(g, c.site)) for c in cands[:3]})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_leaves

from morphir.errors import InvariantError, MorphismError, PreservationError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism, Registry, Site, is_zero, resolve
from morphir.rewriter import ParamEdit, Rewriter
from morphir.verify import Mismatch, find_mismatch

__all__ = ["PassResult", "apply", "candidates", "output_mismatch", "rewrite"]

log = logging.getLogger(__name__)

PRESERVATION_RTOL = 1e-5  # output_mismatch's tolerance; the engine's own check is morphir.verify's

Theta = None | Literal["learned"] | Mapping[Candidate, torch.Tensor]


@dataclass(frozen=True)
class PassResult:
    """What a rewrite produced: the new graph, whether anything changed, and what was applied.

    ``param_edits`` maps each parameter whose shape changed to how it derives from the same-named
    parameter before (rows and columns taken, columns scaled): what :func:`morphir.carry_state`
    uses to carry optimizer state across the rewrite.
    """

    graph: MorphGraph
    modified: bool
    applied: tuple[Candidate, ...]
    param_edits: Mapping[str, ParamEdit] = field(default_factory=dict)


def candidates(graph: MorphGraph, morphism: str | Morphism, *, registry: Registry | None = None) -> list[Candidate]:
    """Every candidate of ``morphism`` on ``graph``: a Morphism instance, or a name looked up in
    ``registry`` (``morphir.candidates`` defaults it to the built-ins).

    >>> cands = candidates(g, "split", registry=morphir.default_registry())
    >>> cands[0].site, cands[0].delta_params
    """
    if not isinstance(graph, MorphGraph):
        raise MorphismError(f"candidates expects a MorphGraph (from morphir.trace), got {type(graph).__name__}")
    return resolve(morphism, registry).candidates(graph)


def _thetas(graph: MorphGraph, cands: Sequence[Candidate], theta: Theta) -> list[torch.Tensor]:
    if not (theta is None or isinstance(theta, (str, Mapping))):
        raise MorphismError(f"theta must be None, 'learned' or a mapping from candidate to θ, got "
                            f"{type(theta).__name__}")
    out = []
    for c in cands:
        if isinstance(theta, str):
            if theta != "learned":
                raise MorphismError(f"theta must be None, 'learned' or a mapping, got {theta!r}")
            if c.theta is None:
                raise MorphismError(f"{c.name}@{c.site} has no learned θ; score it first or pass θ explicitly")
            t = c.theta
        elif theta is not None and c in theta:
            t = torch.as_tensor(theta[c])
        else:
            t = c.morphism.default_theta(graph, c.site)
        expected = c.morphism.theta_shape(graph, c.site)
        if tuple(t.shape) != tuple(expected):
            raise MorphismError(f"θ for {c.name}@{c.site} has shape {tuple(t.shape)}; expected {tuple(expected)}")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise MorphismError(f"θ for {c.name}@{c.site} holds NaN or infinite values; pass finite θ")
        out.append(t.detach())
    return out


def _check_inputs(graph: Any, cands: Any, what: str) -> list[Candidate]:
    if not isinstance(graph, MorphGraph):
        raise MorphismError(f"{what} expects a MorphGraph (from morphir.trace), got {type(graph).__name__}")
    if isinstance(cands, (str, Candidate)) or not isinstance(cands, Sequence):
        raise MorphismError(f"{what} expects a list of candidates (from morphir.candidates), got "
                            f"{type(cands).__name__}")
    bad = [type(c).__name__ for c in cands if not isinstance(c, Candidate)]
    if bad:
        raise MorphismError(f"{what} expects candidates (from morphir.candidates), got {', '.join(sorted(set(bad)))}")
    return list(dict.fromkeys(cands))


def _by_morphism(items: Sequence[tuple[Candidate, torch.Tensor]]) -> list[tuple[Morphism, list[tuple[Site, torch.Tensor]]]]:
    groups: dict[str, tuple[Morphism, list[tuple[Site, torch.Tensor]]]] = {}
    for cand, t in items:
        groups.setdefault(cand.name, (cand.morphism, []))[1].append((cand.site, t))
    return list(groups.values())


def _build(graph: MorphGraph, items: Sequence[tuple[Candidate, torch.Tensor]]) -> tuple[MorphGraph, bool, Rewriter]:
    """Run every morphism's rewrite on a copy of ``graph``; returns the copy, the claimed flag and the rewriter."""
    work = graph.copy()
    work._analysis = graph.analysis  # same structure until edits are applied
    rw = Rewriter(work)
    claimed = False
    for morphism, sites in _by_morphism(items):
        claimed |= bool(morphism.rewrite(rw, sites))
    rw.apply()
    return work, claimed, rw


def _changed(before: MorphGraph, after: MorphGraph) -> bool:
    if before.module.code != after.module.code:
        return True
    a, b = before.module.state_dict(), after.module.state_dict()
    if a.keys() != b.keys():
        return True
    return any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


def output_mismatch(reference: MorphGraph, other: MorphGraph) -> tuple[float, float]:
    """``(max |Δy|, tolerance)`` between two graphs on ``reference``'s probe batch.

    The tolerance is ``1e-5 · (1 + max |y|)``.

    >>> err, tol = morphir.output_mismatch(g, morphir.apply(g, cands))
    """
    ys = [y for y in tree_leaves(reference.run_probe()) if isinstance(y, torch.Tensor)]
    zs = [z for z in tree_leaves(other.run_probe(reference.probe_inputs)) if isinstance(z, torch.Tensor)]
    if len(ys) != len(zs) or any(y.shape != z.shape for y, z in zip(ys, zs)):
        return float("inf"), 0.0
    err = max((float((y.double() - z.double()).abs().max()) for y, z in zip(ys, zs)), default=0.0)
    scale = max((float(y.abs().max()) for y in ys), default=0.0)
    return err, PRESERVATION_RTOL * (1 + scale)


def _check(graph: MorphGraph, items: Sequence[tuple[Candidate, torch.Tensor]],
           built: tuple[MorphGraph, Rewriter] | None = None) -> Mismatch | None:
    work, rw = built if built is not None else _build(graph, items)[::2]
    return find_mismatch(graph, work, edited=rw.edited_groups)


def _verify(graph: MorphGraph, items: Sequence[tuple[Candidate, torch.Tensor]],
            built: tuple[MorphGraph, Rewriter] | None) -> None:
    """Check that the θ = 0 rewrite of the preserving ``items`` changes no activation (see
    :mod:`morphir.verify`); name the culprit, the site and the node if it does."""
    if not items:
        return
    found = _check(graph, items, built)
    if found is None:
        return
    culprit = _bisect(graph, list(items))
    if culprit is None:
        names = ", ".join(sorted({f"{c.name}@{c.site}" for c, _ in items})[:5])
        raise PreservationError(
            f"rewriting {len(items)} candidates together ({names}, ...) at θ = 0 changed {found}, though each "
            "alone preserves it. The original graph is unchanged."
        )
    cand, found = culprit
    raise PreservationError(
        f"morphism {cand.name!r} at site {cand.site} changed {found} at θ = 0; its rewrite is not exact. "
        "The original graph is unchanged."
    )


def _bisect(graph: MorphGraph, items: list[tuple[Candidate, torch.Tensor]]) -> tuple[Candidate, Mismatch] | None:
    """A single failing candidate and what it changed, found by halving; None if only a combination fails."""
    while len(items) > 1:
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            if _check(graph, part) is not None:
                items = part
                break
        else:
            return None
    found = _check(graph, items)
    return (items[0][0], found) if found is not None else None


def rewrite(graph: MorphGraph, cands: Sequence[Candidate], theta: Theta = None, *, verify: bool = True) -> PassResult:
    """Apply ``cands`` in one rewrite and report whether the graph changed.

    ``theta``: None (each morphism's default: 0 for split and deepen, the incoming weights for
    prune), a mapping from candidate to θ (missing ones get the default), or ``"learned"`` (each
    candidate's ``.theta``). With ``verify`` the rewrite of every preserving morphism at θ = 0 is
    run on the probe batch and must match the original; otherwise :class:`PreservationError`.
    ``graph`` itself is never modified.

    >>> result = morphir.rewrite(g, morphir.candidates(g, "split")[:10])
    >>> result.modified, result.graph.num_params() > g.num_params()
    (True, True)
    """
    cands = _check_inputs(graph, cands, "rewrite")
    thetas = _thetas(graph, cands, theta)
    items = list(zip(cands, thetas))
    work, claimed, rw = _build(graph, items) if items else (graph.copy(), False, None)
    actual = _changed(graph, work)
    if claimed != actual:
        who = ", ".join(sorted({c.name for c in cands}))
        raise InvariantError(
            f"morphism(s) {who} reported modified={claimed}, but the graph {'did' if actual else 'did not'} change; "
            "a rewrite must return True exactly when it changes the graph or its weights"
        )
    if verify:
        preserving = [(c, c.morphism.zero_theta(graph, c.site)) for c in cands if c.morphism.preserving]
        all_zero = len(preserving) == len(items) and all(is_zero(t) for t in thetas)
        _verify(graph, preserving, (work, rw) if all_zero else None)
    work.history = graph.history + tuple(f"{c.name}@{c.site}" for c in cands)
    log.debug("applied %d candidates; modified=%s", len(cands), actual)
    return PassResult(work, actual, tuple(cands), dict(rw.param_edits) if rw is not None else {})


def apply(graph: MorphGraph, cands: Sequence[Candidate], theta: Theta = None, *, verify: bool = True) -> MorphGraph:
    """Apply ``cands`` in one rewrite and return the new graph (see :func:`rewrite`).

    >>> g2 = morphir.apply(g, morphir.candidates(g, "split"))
    >>> g2.group("features.0").width == 2 * g.group("features.0").width
    True
    """
    return rewrite(graph, cands, theta, verify=verify).graph
