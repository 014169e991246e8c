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
from typing import Literal

import torch
from torch.utils._pytree import tree_leaves

from morphir.errors import InvariantError, MorphismError, PreservationError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism, Registry, Site, is_zero
from morphir.rewrite import ParamEdit, Rewriter

__all__ = ["PassResult", "default_registry", "morphisms", "candidates", "rewrite", "apply", "output_mismatch"]

log = logging.getLogger(__name__)

PRESERVATION_RTOL = 1e-5

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


def default_registry() -> Registry:
    """A new registry holding the built-in morphisms (``split``, ``prune``, ``deepen``).

    Each call returns a fresh object: registering into it changes nothing global.

    >>> reg = morphir.default_registry()
    >>> reg.names()
    ['split', 'prune', 'deepen']
    """
    from morphir import passes

    return Registry(passes.builtin_morphisms())


def morphisms(registry: Registry | None = None) -> list[str]:
    """Names of the registered morphisms (the built-ins when ``registry`` is None).

    >>> morphir.morphisms()
    ['split', 'prune', 'deepen']
    """
    return (registry or default_registry()).names()


def candidates(graph: MorphGraph, morphism: str | Morphism, *, registry: Registry | None = None) -> list[Candidate]:
    """Every candidate of ``morphism`` (a name or a Morphism instance) on ``graph``.

    >>> cands = morphir.candidates(g, "split")
    >>> cands[0].site, cands[0].delta_params
    """
    m = morphism if isinstance(morphism, Morphism) else (registry or default_registry()).get(morphism)
    return m.candidates(graph)


def _thetas(graph: MorphGraph, cands: Sequence[Candidate], theta: Theta) -> list[torch.Tensor]:
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
        out.append(t.detach())
    return out


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


def _verify(graph: MorphGraph, items: Sequence[tuple[Candidate, torch.Tensor]], built: MorphGraph | None) -> None:
    """Check that the θ = 0 rewrite of the preserving ``items`` keeps the output; name the culprit if not."""
    if not items:
        return
    zero_graph = built if built is not None else _build(graph, items)[0]
    err, tol = output_mismatch(graph, zero_graph)
    if err <= tol:
        return
    culprit, c_err, c_tol = _bisect(graph, list(items)) or (None, err, tol)
    if culprit is None:
        names = ", ".join(sorted({f"{c.name}@{c.site}" for c, _ in items})[:5])
        raise PreservationError(
            f"rewriting {len(items)} candidates together ({names}, ...) at θ = 0 changed the output by "
            f"{err:.3g} (tolerance {tol:.3g}), though each alone preserves it. The original graph is unchanged."
        )
    raise PreservationError(
        f"morphism {culprit.name!r} at site {culprit.site} changed the output by {c_err:.3g} at θ = 0 "
        f"(tolerance {c_tol:.3g}); its rewrite is not exact. The original graph is unchanged."
    )


def _bisect(graph: MorphGraph, items: list[tuple[Candidate, torch.Tensor]]) -> tuple[Candidate, float, float] | None:
    """A single failing candidate, found by halving; None if only a combination fails."""
    while len(items) > 1:
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            err, tol = output_mismatch(graph, _build(graph, part)[0])
            if err > tol:
                items = part
                break
        else:
            return None
    err, tol = output_mismatch(graph, _build(graph, items)[0])
    return (items[0][0], err, tol) if err > tol else None


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
    cands = list(dict.fromkeys(cands))
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
        _verify(graph, preserving, work if all_zero else None)
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
