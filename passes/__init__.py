"""Built-in morphisms, written against morphir's public API only.

Growth methods (growers) are here too, each written as morphisms plus a selection policy.

>>> from morphir.passes import Split, Prune, Deepen
>>> [m.name for m in builtin_morphisms()]
['split', 'prune', 'deepen', 'add_channel']
>>> list(builtin_growers())
['gn', 'net2net', 'random', 'firefly', 'gradmax', 's2d', 'mixture']
"""

from __future__ import annotations

from morphir.api import Grower, Morphism
from morphir.passes.add_channel import AddChannel
from morphir.passes.deepen import Deepen
from morphir.passes.firefly import Firefly
from morphir.passes.gn import GaussNewton
from morphir.passes.gradmax import GradMax
from morphir.passes.mixture import MixtureGrowth
from morphir.passes.net2net import Net2Net
from morphir.passes.prune import Prune
from morphir.passes.random_growth import RandomGrowth
from morphir.passes.s2d import SplittingSteepestDescent
from morphir.passes.split import Split

__all__ = [
    "Split",
    "Prune",
    "Deepen",
    "AddChannel",
    "GaussNewton",
    "Net2Net",
    "RandomGrowth",
    "Firefly",
    "GradMax",
    "SplittingSteepestDescent",
    "MixtureGrowth",
    "builtin_morphisms",
    "builtin_growers",
]


def builtin_morphisms() -> list[Morphism]:
    """Fresh instances of the built-in morphisms, in listing order."""
    return [Split(), Prune(), Deepen(), AddChannel()]


def builtin_growers() -> dict[str, Grower]:
    """Fresh instances of the built-in growth methods by name (``gn``, the paper's, first).

    >>> builtin_growers()["net2net"]
    <grower net2net>
    """
    growers: list[Grower] = [GaussNewton(), Net2Net(), RandomGrowth(), Firefly(), GradMax(), SplittingSteepestDescent(),
                             MixtureGrowth()]
    return {g.name: g for g in growers}
