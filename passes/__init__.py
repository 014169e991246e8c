"""Built-in morphisms, written against morphir's public API only.

>>> from morphir.passes import Split, Prune, Deepen
>>> [m.name for m in builtin_morphisms()]
['split', 'prune', 'deepen']
"""

from __future__ import annotations

from morphir import Morphism
from morphir.passes.deepen import Deepen
from morphir.passes.prune import Prune
from morphir.passes.split import Split

__all__ = ["Split", "Prune", "Deepen", "builtin_morphisms"]


def builtin_morphisms() -> list[Morphism]:
    """Fresh instances of the built-in morphisms, in listing order."""
    return [Split(), Prune(), Deepen()]
