"""The growth loop's settings, :class:`GrowConfig`: validated when made, resolved against a seed's size.

>>> cfg = GrowConfig(phases=4, phase_epochs=10, target_factor=4).resolved(seed_params=274, seed_flops=266)
>>> cfg.target_params
1096
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


from morphir.errors import MorphirError
from morphir.scoring import ScoreConfig

__all__ = ["GrowConfig"]

@dataclass(frozen=True)
class GrowConfig:
    """Everything that decides a growth run (checkpoints refuse to resume under a different one).

    ``lam``: λ of the criterion −ΔL > λ·ΔR (0, the default: every morphism predicted to lower the
    loss qualifies; raise it to favour smaller networks); ``resource``: ΔR counts ``"params"`` or ``"flops"``
    (per sample). ``phases``: training phases (a growth step follows each but the last);
    ``phase_epochs``: epochs per phase; ``final_epochs``: epochs of the last phase, which trains the
    final architecture (None: ``phase_epochs``). ``top_fraction``: at most this share (rounded up) of a
    group's positive morphisms applied per phase. ``lr``, ``momentum``, ``weight_decay``,
    ``nesterov``: SGD; the learning rate follows a cosine from ``lr``. ``schedule``: ``"restart"``
    (the default) starts the cosine again from ``lr`` after every growth step that changed the
    network, over the epochs (or the share of ``budget_flops``) left; ``"cosine"`` is one cosine
    over the whole run. A split's copies start next to each other, in the basin the seed trained
    into, and a learning rate already decayed cannot take them apart: measured (docs/tasks.md),
    the restart lowers the grown net's val loss by 0.017 on ``teacher`` and 0.12 on
    ``digits_augmented`` and leaves ``clusters`` level.
    ``score_batches``: training batches the scoring pass learns θ on (None: a whole epoch);
    ``score``: the scoring pass's own knobs. ``theta``: ``"learned"`` (the method) or ``"random"``
    (θ stays at its random start: Net2Net-style noise, the ablation). ``recalibrate``: before
    scoring, re-estimate batch-norm statistics on the scoring batches, so the function scored (in
    eval mode) is the one the weights compute, not running averages of earlier, noisier weights.
    ``confidence``: a morphism qualifies only when −ΔL − confidence × (standard error of its
    estimate over the samples) > λ·ΔR (0: the paper's rule).
    ``method``: the grower (``gn``, ``net2net``, ``random``, ``firefly``, ``gradmax``, ``s2d``,
    ``mixture``; see :mod:`morphir.passes`). ``when``: grow at the end of every phase of
    ``phase_epochs`` epochs (``"phases"``), or when the training loss has not improved by
    ``plateau_delta`` (relative) for ``patience`` epochs (``"plateau"``; at most ``phases − 1``
    growth steps). ``budget_flops``: stop when training (3 × forward FLOPs per sample per epoch)
    plus the growth steps' own FLOPs reach this many; the learning rate then follows the cosine in
    the share of the budget spent, and the last phase lasts until the budget is spent. A growth
    step that spends the rest of the budget is not applied (nothing could train what it grew): the
    run ends with the network the last phase trained.
    ``target_params`` / ``target_flops``: grow to this size (parameters, or FLOPs per sample) by
    the growth step after phase ``target_phase`` (None: half the phases, rounded up): each step adds
    its share of what is left, split evenly over the steps until then, and the grower chooses where
    (for ``gn``: the candidates with the best estimated loss change per unit added, one per channel,
    whatever λ says). ``target_factor``: the same, relative to the seed: grow to this many times the
    seed's parameters (``resource="params"``) or FLOPs per sample (``"flops"``); an absolute target
    takes precedence. The default, 4 × the seed by the middle growth step, is the measured choice
    (docs/tasks.md): the λ rule alone adds width too little and too late. ``target_factor=None``
    with no absolute target leaves how much to grow to the λ rule (``lam``, ``top_fraction``,
    ``confidence``), the paper's method. ``count_growth_flops``: count each growth step's FLOPs (``growth_flops`` in
    its record, and in ``train_flops``) without a budget too (torch's flop counter slows a step
    about 2.5×). ``seed``: every shuffle, initial θ and scoring pass derives from it.
    """

    lam: float = 0.0
    resource: Literal["params", "flops"] = "params"
    phases: int = 5
    phase_epochs: int = 20
    final_epochs: int | None = None
    top_fraction: float = 0.3
    morphisms: tuple[str, ...] = ("split", "prune")
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: Literal["restart", "cosine"] = "restart"
    score_batches: int | None = 8
    score: ScoreConfig = field(default_factory=ScoreConfig)
    theta: Literal["learned", "random"] = "learned"
    recalibrate: bool = True
    confidence: float = 0.0
    method: str = "gn"
    when: Literal["phases", "plateau"] = "phases"
    patience: int = 3
    plateau_delta: float = 0.01
    budget_flops: float | None = None
    target_params: int | None = None
    target_flops: float | None = None
    target_phase: int | None = None
    target_factor: float | None = 4.0
    count_growth_flops: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def integer(name: str, low: int, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise MorphirError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name: str, value: Any, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > low if strict else value >= low) and (high is None or value <= high)
            if not ok:
                bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                raise MorphirError(f"{name} must be a finite number {bound}, got {value!r}")

        if self.when not in ("phases", "plateau"):
            raise MorphirError(f"when must be 'phases' or 'plateau', got {self.when!r}")
        if self.resource not in ("params", "flops"):
            raise MorphirError(f"resource must be 'params' or 'flops', got {self.resource!r}")
        if self.schedule not in ("restart", "cosine"):
            raise MorphirError(f"schedule must be 'restart' or 'cosine', got {self.schedule!r}")
        if self.theta not in ("learned", "random"):
            raise MorphirError(f"theta must be 'learned' or 'random', got {self.theta!r}")
        integer("phases", 1, self.phases)
        integer("phase_epochs", 1, self.phase_epochs)
        if self.final_epochs is not None:
            integer("final_epochs", 1, self.final_epochs)
        integer("patience", 1, self.patience)
        integer("seed", 0, self.seed)
        if self.score_batches is not None:
            integer("score_batches", 1, self.score_batches)
        number("plateau_delta", self.plateau_delta, high=0.999999)
        if self.budget_flops is not None:
            number("budget_flops", self.budget_flops, strict=True)
        if self.target_params is not None:
            integer("target_params", 1, self.target_params)
        if self.target_flops is not None:
            number("target_flops", self.target_flops, strict=True)
        if self.target_params is not None and self.target_flops is not None:
            raise MorphirError("give target_params or target_flops, not both")
        if self.target_factor is not None:
            number("target_factor", self.target_factor, low=1.0, strict=True)
        if self.target_phase is not None:
            integer("target_phase", 1, self.target_phase)
            if self.target_phase > max(self.phases - 1, 1):
                raise MorphirError(f"target_phase must be at most the last growth step ({self.phases - 1}), got "
                                   f"{self.target_phase}")
        number("top_fraction", self.top_fraction, strict=True, high=1.0)
        number("lam", self.lam)
        number("confidence", self.confidence)
        number("lr", self.lr, strict=True)
        number("momentum", self.momentum, high=0.999999)
        number("weight_decay", self.weight_decay)
        if not isinstance(self.morphisms, tuple) or not all(isinstance(m, str) for m in self.morphisms):
            raise MorphirError(f"morphisms must be a tuple of morphism names, got {self.morphisms!r}")

    @property
    def target(self) -> tuple[str, float] | None:
        """``(resource, size)`` the run grows to, or None (the λ rule decides how much)."""
        if self.target_params is not None:
            return ("params", float(self.target_params))
        if self.target_flops is not None:
            return ("flops", float(self.target_flops))
        return None

    def resolved(self, seed_params: int, seed_flops: float) -> GrowConfig:
        """This config with ``target_factor`` turned into an absolute target for a seed of that size
        (unchanged without a factor, or with an absolute target already).

        >>> GrowConfig(target_factor=4).resolved(274, 266).target_params
        1096
        """
        if self.target_factor is None or self.target is not None:
            return self
        if self.resource == "flops":
            return dataclasses.replace(self, target_flops=self.target_factor * float(seed_flops))
        return dataclasses.replace(self, target_params=max(1, round(self.target_factor * seed_params)))

    def step_budget(self, phase: int, size: float) -> float:
        """How much the growth step after ``phase`` adds toward the target from ``size``: what is left,
        split evenly over the steps up to the target phase (all of it past that phase; 0 at the target).

        >>> GrowConfig(phases=5, target_params=1000, target_phase=2).step_budget(1, 400)
        300.0
        """
        target = self.target
        if target is None:
            raise MorphirError("step_budget needs target_params or target_flops")
        last = self.target_phase if self.target_phase is not None else math.ceil((self.phases - 1) / 2) or 1
        if size >= target[1]:
            return 0.0
        return (target[1] - size) / max(last - phase + 1, 1)  # past the target phase: catch up at once

    @property
    def epochs(self) -> int:
        """Total training epochs of the run (without a FLOPs budget)."""
        last = self.phase_epochs if self.final_epochs is None else self.final_epochs
        return (self.phases - 1) * self.phase_epochs + last

    def as_dict(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        out = dataclasses.asdict(self)
        out["morphisms"] = list(self.morphisms)
        return out

