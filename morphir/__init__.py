"""morphir: grow neural networks by rewriting their torch.fx graphs.

The package's names are the core's (:mod:`morphir.api`) with the built-in morphisms and growth
methods of :mod:`morphir.passes` as defaults (:mod:`morphir.defaults`).

>>> import torch, morphir
>>> g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8)), torch.randn(1, 1, 8, 8))
>>> g2 = morphir.apply(g, morphir.candidates(g, "split"))   # every channel split, θ = 0
>>> morphir.output_mismatch(g, g2)[0] < 1e-4
True
"""

from morphir import api, passes
from morphir.api import *  # noqa: F403 (the core's public names, listed in morphir.api.__all__)
from morphir.defaults import Scorer, candidates, default_registry, grow, morphisms, resolve_grower, score

__version__ = "0.1.0"

__all__ = sorted({*api.__all__, "default_registry", "morphisms", "passes"}, key=lambda n: (n.lower(), n))
