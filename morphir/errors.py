"""Typed errors raised by morphir.

Every error says what happened, where (module, node, group, site) and what to do next.
All derive from :class:`MorphirError`, so ``except morphir.MorphirError`` catches them all.
"""

from __future__ import annotations

__all__ = [
    "MorphirError",
    "TraceError",
    "AnalysisError",
    "MorphismError",
    "PreservationError",
    "InvariantError",
    "LoadError",
    "ExportError",
    "DataError",
    "TrainingError",
    "CheckpointError",
]


class MorphirError(Exception):
    """Base class of every error morphir raises on purpose."""


class TraceError(MorphirError):
    """A model could not be traced into a torch.fx graph."""


class AnalysisError(MorphirError):
    """The channel analysis was asked for something the graph does not have."""


class MorphismError(MorphirError):
    """A morphism or a candidate was used wrongly (unknown name, bad site, bad θ shape)."""


class InvariantError(MorphismError):
    """A pass broke the engine's contract (a false ``modified`` claim, a graph that fails lint)."""


class PreservationError(InvariantError):
    """A rewrite at θ = 0 changed the network's function beyond tolerance."""


class LoadError(MorphirError):
    """A model file could not be loaded (missing, corrupt, or needs unsafe unpickling)."""


class ExportError(MorphirError):
    """An export (ONNX, torch.export, a compiled copy) or its check failed."""


class DataError(MorphirError):
    """A data source is missing, unreadable, malformed, or does not fit the model."""


class TrainingError(MorphirError):
    """Training diverged (a NaN or infinite loss)."""


class CheckpointError(MorphirError):
    """A checkpoint could not be written, read, or does not match the run being resumed."""
