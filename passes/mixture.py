"""``mixture``: MixtureGrowth (Pham, Teterwak, Nelson, Plummer, WACV 2024, arXiv 2311.04251).

Every convolution and linear layer generates its weight from *templates*: ``W = Σₖ αₖ Tₖ``, with
one bank of templates shared by adjacent layers of the same shape and a coefficient vector α per
layer (:func:`mix`, what :meth:`MixtureGrowth.prepare` does to the seed). Growth by a factor g
*tiles* each layer: the grown weight is a g×g block matrix (g×1 for the first layer, which keeps
its inputs, and for depthwise convs; 1×g for the classifier, which keeps its outputs) whose blocks
are the templates mixed by their own coefficient vectors (:func:`widen`). With *fusion*, g − 1
more small nets are trained from scratch at the growth step and the grown net's templates are the
union of all nets' templates: block (n, n) is net n's layer (its own coefficients on its own
templates, its batch-norm channels and biases) and only the off-diagonal blocks get new
coefficients, initialised ``random``, ``copy`` (the coefficients of the net whose diagonal block
shares the row) or ``orthogonal`` (orthogonal to every coefficient vector the layer already has,
and to each other while there is room). The classifier averages the nets' outputs, so with the
off-diagonal blocks at zero the fused net computes exactly the mean of the nets' logits.

The weight is computed by a :mod:`torch.nn.utils.parametrize` parametrization (:class:`TemplateMix`),
so a mixed layer stays an ``nn.Conv2d`` / ``nn.Linear`` for torch.fx, the channel analysis and the
ONNX exporter. Such a module cannot be pickled whole (``torch.save(module)``); :func:`bake` turns
the mixed layers back into plain ones.

>>> from morphir.passes.mixture import MixtureGrowth
>>> res = morphir.grow(zoo.build("vgg19", (1, 8, 8), 10), data.train, data.val, F.cross_entropy,
...                    method=MixtureGrowth(factor=2, init="orthogonal"), phases=2, phase_epochs=5)
>>> res.metrics[0]["loss_jump"], res.metrics[-1]["widths"]["features.0.0"]   # a finite jump, 32 channels
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from morphir.api import (CheckpointError, GrowConfig, Grower, Growth, GrowthStep, MorphGraph, MorphirError, PassResult,
                         Registry, TrainingError, cosine_lr, recalibrate_batch_norm, sgd, train_epoch)
from morphir.passes.mixture_layers import (INITS, Init, TemplateMix, _CPU, _mixer, _rebuilt, _reinitialise, bake, mix,
                                           mixed_layers)
from morphir.passes.mixture_widen import _shape_record, _widen, widen

__all__ = ["MixtureGrowth", "TemplateMix", "bake", "mix", "mixed_layers", "widen"]

log = logging.getLogger(__name__)


# -- the grower ---------------------------------------------------------------------------------------
class MixtureGrowth(Grower):
    """MixtureGrowth: template-mixing layers, grown ``factor``× by tiling (and fusing ``factor − 1``
    freshly trained nets when ``fuse``); new coefficient blocks by ``init``.

    Not function-preserving: the new off-diagonal blocks (and with fusion the other nets' halves)
    change the output at growth; the loop measures the jump (``record["loss_jump"]``). Only the first
    ``steps`` growth steps grow (later ones add nothing), so the width does not multiply every phase.
    ``templates``: per bank; ``share``: at most this many adjacent same-shape layers per bank
    (None: all); ``scale``: norm of new coefficient vectors relative to the existing ones.

    >>> morphir.grow(model, train, val, F.cross_entropy, method=MixtureGrowth(factor=2, init="copy"))
    """

    name = "mixture"
    description = "MixtureGrowth: template-mixing layers, widened by tiling and fusing a second trained net"
    preserving = False

    def __init__(self, factor: int = 2, init: Init = "orthogonal", fuse: bool = True, templates: int = 4,
                 steps: int = 1, share: int | None = None, scale: float = 1.0) -> None:
        if not isinstance(factor, int) or factor < 2:
            raise MorphirError(f"mixture: factor must be an int >= 2, got {factor!r}")
        if init not in INITS:
            raise MorphirError(f"mixture: init must be one of {', '.join(INITS)}, got {init!r}")
        if templates < 1 or (init == "orthogonal" and templates < 2):
            raise MorphirError(f"mixture: templates must be at least {2 if init == 'orthogonal' else 1} "
                               f"(init={init!r}), got {templates}")
        if steps < 1 or (share is not None and share < 1) or not scale > 0:
            raise MorphirError(f"mixture: steps and share must be >= 1 and scale > 0, got {steps}, {share}, {scale}")
        self.factor, self.init, self.fuse, self.templates = factor, init, fuse, templates
        self.steps, self.share, self.scale = steps, share, scale

    def __repr__(self) -> str:
        return (f"<grower {self.name} factor={self.factor} init={self.init} fuse={self.fuse} "
                f"templates={self.templates} steps={self.steps}>")

    def finalize(self, graph: MorphGraph) -> MorphGraph:
        """A copy of ``graph`` with every mixed layer baked into a plain layer (:func:`bake`): the same
        function, no parametrizations, so ``torch.save(module)`` and any deployment path work.

        >>> plain = MixtureGrowth().finalize(result.graph)
        """
        if not mixed_layers(graph.module):
            return graph
        return _rebuilt(graph, bake(copy.deepcopy(graph.module)), "baking template mixing")

    def prepare(self, graph: MorphGraph, config: GrowConfig) -> MorphGraph:
        """The seed in template-mixing form (:func:`mix`), drawn from the run's seed.

        >>> g = MixtureGrowth().prepare(seed_graph, morphir.GrowConfig())
        """
        return mix(graph, templates=self.templates, share=self.share, seed=config.seed)

    def grow(self, step: GrowthStep) -> Growth:
        """Widen the net ``factor``× (training and fusing the other nets first at the first growth).

        >>> growth = MixtureGrowth().grow(step); growth.result.graph.num_params()
        """
        graph = step.graph
        layers = mixed_layers(graph.module)
        if not layers:
            raise MorphirError("mixture: the graph has no template-mixed layers; was it prepared by MixtureGrowth?")
        done = max(_mixer(m).growths for m in layers.values())
        if done >= self.steps:
            return Growth()
        fuse = self.fuse and done == 0
        others, losses = [], []
        for n in range(1, self.factor if fuse else 1):
            net, loss = self._train_other(step, n)
            others.append(net)
            losses.append(loss)
        grown = _widen(graph, self.factor, 1 + len(others), others, self.init, self.scale, step.generator(salt=1000))
        if step.config.recalibrate:
            recalibrate_batch_norm(grown.module, step.batches)
        entry = {"morphism": self.name, "factor": self.factor, "nets": 1 + len(others),
                 "layers": _shape_record(grown.module)}
        info: dict[str, Any] = {"applied": {self.name: 1}, "mixture_factor": self.factor,
                                "mixture_nets": 1 + len(others), "mixture_init": self.init,
                                "mixture_other_train_loss": losses}
        log.info("mixture: widened %dx%s; %d -> %d params", self.factor,
                 f", fused {len(others)} more net(s) (final train loss {losses})" if others else "",
                 graph.num_params(), grown.num_params())
        return Growth(result=PassResult(graph=grown, modified=True, applied=(), param_edits={}), log=[entry],
                      chosen=[], info=info)

    def _train_other(self, step: GrowthStep, n: int) -> tuple[nn.Module, float]:
        """Net n: the current architecture from scratch, trained as long as phase 1 with the run's SGD."""
        cfg = step.config
        module = copy.deepcopy(step.graph.module).to(_CPU)
        _reinitialise(module, step.generator(salt=n))
        opt = sgd(module, cfg)
        loss = float("nan")
        seed = int(torch.randint(0, 2**62, (1,), generator=step.generator(salt=100 + n)))
        with torch.random.fork_rng(devices=[]):
            for e in range(cfg.phase_epochs):
                for group in opt.param_groups:  # phase 1's part of the run's cosine
                    group["lr"] = cosine_lr(cfg, e, cfg.epochs)
                torch.manual_seed(seed + e)
                try:
                    loss = train_epoch(module, opt, step.train, step.loss_fn, device=_CPU,
                                       where=f"MixtureGrowth's net {n + 1}, epoch {e + 1}")
                except TrainingError as exc:
                    raise TrainingError(f"{exc} (training the net to fuse)") from None
        module.eval()
        return module, loss

    def replay(self, graph: MorphGraph, entries: Sequence[Mapping[str, Any]], registry: Registry) -> MorphGraph:
        """Rebuild the structure of one logged growth step (weights are loaded afterwards).

        >>> graph = MixtureGrowth().replay(graph, result.log[0], registry)
        """
        for e in entries:
            if e.get("morphism") != self.name:
                raise CheckpointError(f"the checkpoint applies {e.get('morphism')!r}, not a MixtureGrowth step")
            graph = _widen(graph, int(e["factor"]), int(e["nets"]), None, self.init, self.scale, None)
            got = _shape_record(graph.module)
            if got != dict(e["layers"]):
                raise CheckpointError("the replayed MixtureGrowth step builds other layers than the checkpoint's "
                                      "(it was made from a different model or with other templates)")
        return graph
