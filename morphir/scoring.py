"""Gauss-Newton scoring: learn θ for every candidate and estimate the loss change ΔL.

For a morphism whose change first appears at z, with g = ∂L/∂z and L̂ the loss,

    ΔL(θ) ≈ Δz(θ)·g + (Δz(θ)·g)² / (4 L̂)

(Lawton, Galstyan, Ver Steeg, arXiv 2411.05855). One forward/backward per batch captures the
activations and the gradients at every point a morphism reads; each morphism's
:meth:`~morphir.ScoredMorphism.local_change` turns them into s = Δz·g per sample for all its sites of
one batch key at once (every channel of a layer together); θ is learned by Adam on the estimate
with the weights frozen, kept in a trust region, and the estimate is averaged over batches (EMA).

>>> cands = morphir.score(g, train_batches, torch.nn.functional.cross_entropy)
>>> best = sorted(cands, key=lambda c: c.estimate)[:10]
>>> g2 = morphir.apply(g, best, "learned")
"""

from __future__ import annotations

import logging
from abc import abstractmethod
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.func import hessian, vmap

from morphir.batches import as_args, eval_mode, mean_loss
from morphir.channels import ChannelGroup
from morphir.engine import apply
from morphir.errors import MorphirError, MorphismError, TrainingError
from morphir.graph import MorphGraph
from morphir.morphism import Candidate, Morphism, Registry, Site, resolve

__all__ = [
    "ScoredMorphism",
    "ScoreContext",
    "ScoreConfig",
    "score",
    "Scorer",
    "Capturer",
    "capture",
    "propagate",
    "dot_at_consumers",
    "gn_estimate",
    "grad_dot",
    "curvature_factors",
    "spearman",
    "exact_delta_loss",
    "exact_delta_losses",
]

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[tuple[Any, Any]]] | Iterable[tuple[Any, Any]]
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]

SCORE_KEY = "morphir.score"
_MIN_LOSS = 1e-8
CURVATURES = ("rank-one", "gauss-newton")
MAX_CURVATURE_OUTPUTS = 64  # output features per sample up to which the exact Gauss-Newton term is used


class ScoredMorphism(Morphism):
    """The scoring protocol: a :class:`~morphir.Morphism` the Gauss-Newton pass can estimate.

    It adds :meth:`local_change` (Δz·g per site and sample) and hooks with defaults: which sites
    are scored together, θ's start and trust radius, and which gradients the pass captures. A
    morphism that does not score subclasses :class:`~morphir.Morphism` alone and stays small; it
    may say why in ``why_not_scored``, which the error names when it is asked for.

    >>> class Split(morphir.ScoredMorphism):
    ...     def local_change(self, ctx, sites, theta): ...
    """

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

    @abstractmethod
    def local_change(self, ctx: ScoreContext, sites: Sequence[Site], theta: torch.Tensor) -> torch.Tensor:
        """Δz(θ)·g per site and sample, shape ``(len(sites), N)``, differentiable in ``theta``.

        Δz is the change the morphism makes where it first appears (a consumer's input, the output
        of an anchor node) and g the per-sample loss gradient there, both read from ``ctx``; the
        scoring pass turns it into ΔL ≈ s + s²/(4L).
        """


@dataclass(frozen=True)
class ScoreConfig:
    """Knobs of the scoring pass (defaults are the measured choices, see docs/scoring.md).

    ``trust``: θ of a site is kept within ``trust`` × the norm of the weights it perturbs.
    ``ema``: momentum of the moving average of ΔL over batches.
    ``per_sample``: estimate Σᵢ [sᵢ + sᵢ²/(4Lᵢ)] / N instead of the paper's whole-batch s + s²/(4L̂).
    ``final_pass``: after learning θ, :func:`score` makes one more pass over the batches with θ
    fixed and reports the mean estimate there, so the estimate belongs to the θ returned (the EMA
    lags behind a θ that is still moving and understated splits' ΔL about threefold).
    ``curvature``: the second-order term of the estimate. ``"rank-one"`` is the paper's
    (Δz·g)²/(4L), the curvature of the loss along g alone; ``"gauss-newton"`` is ½ Δzᵀ Jᵀ H J Δz,
    with H the Hessian of each sample's loss at the network's output and J the Jacobian from z to
    it, computed exactly from H's eigenvectors (one batched backward pass per output feature; with
    more than ``MAX_CURVATURE_OUTPUTS`` output features per sample, rank-one is used). Rank-one
    sees no curvature across g, so Adam moves θ there freely: the estimates overstate the gain and
    the true loss can rise (see docs/tasks.md).
    """

    lr: float = 1e-2
    trust: float = 0.3
    ema: float = 0.9
    per_sample: bool = True
    epochs: int = 1
    seed: int = 0
    final_pass: bool = True
    curvature: str = "rank-one"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise MorphirError(f"ScoreConfig.curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}")


class ScoreContext:
    """One batch's activations and gradients, as morphisms see them when scoring.

    ``value(node)``: the node's output; ``grad(node)``: ∂(Σₙ Lₙ)/∂ output (every user's share);
    ``input_grad(node)``: the gradient at the first input of the call ``node`` through that call
    only (what a consumer layer passes back); ``losses``: per-sample losses Lₙ.

    With Gauss-Newton curvature (``ScoreConfig(curvature="gauss-newton")``) the context also holds
    K *curvature probes*: gradients of the network output along the square-root factors of each
    sample's loss Hessian, so that Σₖ (Δz·gₖ)² = Δzᵀ Jᵀ H J Δz. ``probe_grad(node)`` and
    ``probe_input_grad(call)`` give them stacked, shape (K, *gradient shape); ``probes`` is K (0
    without). :func:`dot_at_consumers` and :func:`grad_dot` use them when present.

    ``memo`` is one dict for the whole scoring pass (the weights do not change during it): a
    morphism may keep there what depends on the weights only (stacked incoming weights, folded
    batch-norm scales), keyed by its own name. The network is in eval mode while morphisms run.
    """

    def __init__(self, graph: MorphGraph, values: dict[str, Any], grads: dict[str, torch.Tensor],
                 input_grads: dict[str, torch.Tensor], losses: torch.Tensor, *,
                 memo: dict[Any, Any] | None = None, probe_grads: dict[str, torch.Tensor] | None = None,
                 probe_input_grads: dict[str, torch.Tensor] | None = None):
        self.graph = graph
        self.values = values
        self.grads = grads
        self.input_grads = input_grads
        self.losses = losses
        self.probe_grads = probe_grads or {}
        self.probe_input_grads = probe_input_grads or {}
        any_probe = next(iter({**self.probe_grads, **self.probe_input_grads}.values()), None)
        self.probes = 0 if any_probe is None else int(any_probe.shape[0])
        self.memo: dict[Any, Any] = {} if memo is None else memo
        if "morphir.nodes" not in self.memo:
            self.memo["morphir.nodes"] = {n.name: n for n in graph.module.graph.nodes}
            self.memo["morphir.modules"] = {}
        self._nodes: dict[str, fx.Node] = self.memo["morphir.nodes"]
        self._modules: dict[str, torch.nn.Module] = self.memo["morphir.modules"]

    def module(self, target: str) -> torch.nn.Module:
        """The submodule ``target`` (cached lookup)."""
        if target not in self._modules:
            self._modules[target] = self.graph.module.get_submodule(target)
        return self._modules[target]

    def node(self, name: str) -> fx.Node:
        """The fx node called ``name``."""
        return self._nodes[name]

    def value(self, name: str) -> torch.Tensor:
        """Output of node ``name`` on this batch (detached)."""
        return self.values[name]

    def grad(self, name: str) -> torch.Tensor:
        """Per-sample gradient of the loss at the output of ``name``."""
        if name not in self.grads:
            raise MorphismError(f"no gradient captured at node {name!r}; list it in ScoredMorphism.grad_nodes")
        return self.grads[name]

    def input_grad(self, call: str) -> torch.Tensor:
        """Per-sample gradient at the first input of the call ``call``, through that call only."""
        return self.input_grads[call]

    def probe_grad(self, name: str) -> torch.Tensor:
        """The curvature probes' gradients at the output of ``name``, shape (K, *value shape)."""
        return self.probe_grads[name]

    def probe_input_grad(self, call: str) -> torch.Tensor:
        """The curvature probes' gradients at the first input of ``call``, through that call only."""
        return self.probe_input_grads[call]

    def run_node(self, name: str, replace: Mapping[str, torch.Tensor], *, repeat: int = 1) -> torch.Tensor:
        """Re-run node ``name`` with the outputs of some of its input nodes replaced.

        ``repeat``: the replacements hold that many variants stacked along the batch; the other
        tensor inputs with a batch dimension are repeated to match.
        """
        node = self._nodes[name]
        batch = self.losses.shape[0]

        def fetch(n: fx.Node) -> Any:
            if n.name in replace:
                return replace[n.name]
            value = self.values[n.name]
            if repeat > 1 and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.repeat(repeat, *([1] * (value.dim() - 1)))
            return value

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), fetch)
        if node.op == "call_module":
            return self.module(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise MorphismError(f"cannot re-run node {name!r} ({node.op})")


class Capturer:
    """A generated copy of the network's forward that returns every node's output, where each
    consumer call in ``alias_calls`` reads an alias of its input, so the gradient through that
    call alone can be taken. Built once per scoring pass (plain generated code, no interpreter).

    >>> cap = Capturer(g, alias_calls=["features_1_0"])
    >>> ctx = cap(x, y, F.cross_entropy)
    """

    def __init__(self, graph: MorphGraph, *, grad_nodes: Iterable[str] = (), alias_calls: Iterable[str] = (),
                 curvature: str = "rank-one"):
        self.graph = graph
        self.curvature = curvature
        self.grad_nodes = list(dict.fromkeys(grad_nodes))
        alias_calls = set(alias_calls)
        src = graph.module.graph
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        outputs: dict[str, fx.Node] = {}
        aliases: dict[str, fx.Node] = {}
        for n in src.nodes:
            if n.op == "output":
                continue
            if n.name in alias_calls and n.args and isinstance(n.args[0], fx.Node):
                first = env[n.args[0]]
                alias = new.call_method("view_as", (first, first))
                aliases[n.name] = alias
                args = (alias, *fx.node.map_arg(n.args[1:], lambda a: env[a]))
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                env[n] = new.create_node(n.op, n.target, args, kwargs, name=n.name)
            else:
                env[n] = new.node_copy(n, lambda a: env[a])
            outputs[n.name] = env[n]
        out_node = next(n for n in src.nodes if n.op == "output")
        result = fx.node.map_arg(out_node.args[0], lambda a: env[a])
        new.output((result, outputs, aliases))
        self.module = fx.GraphModule(graph.module, new)
        self.alias_names = list(aliases)

    def __call__(self, x: Any, y: Any, loss_fn: LossFn, *, memo: dict[Any, Any] | None = None) -> ScoreContext:
        """Run one batch in eval mode: the values, gradients and per-sample losses scoring needs."""
        with eval_mode(self.graph.module), torch.enable_grad():
            inputs = as_args(x)
            out, values, aliases = self.module(*inputs)
            losses = per_sample_losses(loss_fn, out, y)
            if not bool(torch.isfinite(losses).all()):
                raise TrainingError("the loss is NaN or infinite on this batch; check the data and the model before scoring")
            wanted = [values[n] for n in self.grad_nodes]
            targets = wanted + [aliases[n] for n in self.alias_names]
            factors = None
            if self.curvature == "gauss-newton" and targets and isinstance(out, torch.Tensor):
                factors = curvature_factors(loss_fn, out.detach(), y)
            grads = torch.autograd.grad(losses.sum(), targets, allow_unused=True,
                                        retain_graph=factors is not None) if targets else []
            probe = _probe_grads(out, targets, factors) if factors is not None else None
        node_grads = {n: (g if g is not None else torch.zeros_like(v)).detach()
                      for n, v, g in zip(self.grad_nodes, wanted, grads)}
        alias_grads = {n: (g if g is not None else torch.zeros_like(aliases[n])).detach()
                       for n, g in zip(self.alias_names, grads[len(wanted):])}
        probe_nodes = probe_alias = None
        if probe is not None:
            k = factors.shape[0]
            zeros = lambda v: v.new_zeros((k, *v.shape))  # noqa: E731
            probe_nodes = {n: (g if g is not None else zeros(v)).detach()
                           for n, v, g in zip(self.grad_nodes, wanted, probe)}
            probe_alias = {n: (g if g is not None else zeros(aliases[n])).detach()
                           for n, g in zip(self.alias_names, probe[len(wanted):])}
        values = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return ScoreContext(self.graph, values, node_grads, alias_grads, losses.detach(), memo=memo,
                            probe_grads=probe_nodes, probe_input_grads=probe_alias)


def curvature_factors(loss_fn: LossFn, output: torch.Tensor, target: Any) -> torch.Tensor | None:
    """Square-root factors of each sample's loss Hessian at the output: U of shape (K, *output
    shape) with Σₖ uₖ uₖᵀ = ∇²ₒ Lₙ for every sample n (K = the output features per sample; the
    negative part of an indefinite Hessian is dropped). None when a sample has more than
    ``MAX_CURVATURE_OUTPUTS`` output features or the loss has no Hessian torch can take.

    >>> U = curvature_factors(F.cross_entropy, logits, y)    # (10, 64, 10) for 10 classes
    """
    n = output.shape[0]
    features = output[0].numel() if output.dim() > 0 and n > 0 else 0
    if not 0 < features <= MAX_CURVATURE_OUTPUTS:
        return None
    flat = output.detach().reshape(n, features)

    def sample_loss(o: torch.Tensor, t: Any) -> torch.Tensor:
        return loss_fn(o.reshape(1, *output.shape[1:]), t.unsqueeze(0) if isinstance(t, torch.Tensor) else t)

    try:
        h = vmap(hessian(sample_loss))(flat, target)
    except Exception:  # noqa: BLE001 - a loss vmap cannot trace: one sample at a time
        try:
            h = torch.stack([torch.autograd.functional.hessian(lambda o: sample_loss(o, target[i]), flat[i])
                             for i in range(n)])
        except Exception:  # noqa: BLE001 - no Hessian: the caller falls back to rank-one
            log.info("no Hessian of the loss at the output; scoring with the rank-one curvature")
            return None
    h = h.reshape(n, features, features).to(torch.float64)
    vals, vecs = torch.linalg.eigh((h + h.transpose(1, 2)) / 2)
    factors = vecs * vals.clamp_min(0).sqrt().unsqueeze(1)  # column k: √λₖ qₖ
    return factors.permute(2, 0, 1).reshape(features, *output.shape).to(output.dtype)


def _probe_grads(out: torch.Tensor, targets: list[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients at ``targets`` of ⟨out, uₖ⟩ for every factor k, stacked (K, *target shape)."""
    try:
        return list(torch.autograd.grad(out, targets, grad_outputs=factors, is_grads_batched=True, allow_unused=True))
    except RuntimeError:  # an op without a batched backward: one factor at a time
        per = [torch.autograd.grad(out, targets, grad_outputs=u, allow_unused=True, retain_graph=True) for u in factors]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(targets))]


def _batches(batches: Batches) -> Iterable[tuple[Any, Any]]:
    return batches() if callable(batches) else batches


def per_sample_losses(loss_fn: LossFn, output: torch.Tensor, target: Any) -> torch.Tensor:
    """Per-sample losses from a mean-reduced ``loss_fn``.

    Uses ``loss_fn(output, target, reduction="none")`` when the function takes it (torch's losses
    do), averaged over each sample's elements; otherwise calls it on each sample (vmap).

    >>> per_sample_losses(F.cross_entropy, logits, y).shape
    torch.Size([64])
    """
    try:
        losses = loss_fn(output, target, reduction="none")
        if isinstance(losses, torch.Tensor) and losses.dim() >= 1 and losses.shape[0] == output.shape[0]:
            return losses.reshape(losses.shape[0], -1).mean(dim=1)
    except TypeError:
        pass
    try:
        from torch.func import vmap

        return vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(output, target)
    except Exception:  # noqa: BLE001 - loss functions vmap cannot trace fall back to a loop
        return torch.stack([loss_fn(output[i : i + 1], target[i : i + 1]) for i in range(output.shape[0])])


def capture(graph: MorphGraph, x: Any, y: Any, loss_fn: LossFn, *, grad_nodes: Iterable[str] = (),
            alias_calls: Iterable[str] = ()) -> ScoreContext:
    """Run one batch in eval mode and capture what scoring needs. Weights and ``.grad`` are untouched.

    Builds a :class:`Capturer` for this one call; keep a Capturer to capture many batches.

    >>> ctx = capture(g, x, y, F.cross_entropy, alias_calls=["features_1_0"])
    """
    return Capturer(graph, grad_nodes=grad_nodes, alias_calls=alias_calls)(x, y, loss_fn)


# -- helpers for channel morphisms ---------------------------------------------------------------------
def propagate(
    ctx: ScoreContext, group: ChannelGroup, start: Mapping[str, torch.Tensor], *, stacked: int = 1
) -> dict[str, torch.Tensor] | None:
    """Carry replaced producer outputs through the group's pass-through nodes (BN, activations,
    adds, concats, pooling, flatten), returning the value every carrier node would take.

    Ops on a group's channels act channel by channel, so one tensor can hold a different variant
    of every channel at once: all channels of a layer are handled in one call. With ``stacked=k``
    the start values hold k variants stacked along the batch; the other inputs are repeated to
    match, and None is returned if some op does not keep the stacked batch (then run them apart).
    """
    vals = dict(start)
    batch = ctx.losses.shape[0]
    for name in group.nodes:
        if name in vals:
            continue
        node = ctx.node(name)
        inputs = [a.name for a in node.all_input_nodes if a.name in vals]
        if inputs:
            out = ctx.run_node(name, {i: vals[i] for i in inputs}, repeat=stacked)
            if stacked > 1 and (not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != stacked * batch):
                return None
            vals[name] = out
    return vals


def dot_at_consumers(ctx: ScoreContext, group: ChannelGroup, delta: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Σ over the group's consumers of Δz·g per channel and sample, shape (width, N).

    ``delta(node)`` gives Δz at a node a consumer reads (None: unchanged); g is the gradient
    through that consumer only. With curvature probes in ``ctx`` (``ctx.probes`` = K > 0) the
    result is (width, N, 1 + K): Δz·g, then Δz·gₖ for each probe (see :func:`gn_estimate`).
    """
    total = None
    k = ctx.probes
    for cons in group.consumers:
        read = ctx.node(cons.node).args[0].name
        dz = delta(read)
        if dz is None:
            continue
        g = ctx.input_grad(cons.node)
        layout = ctx.graph.layout(read)
        seg = cons.segment
        if k:  # the gradient and the probes' gradients along the batch: ((1 + K)·N, ...)
            g = torch.cat([g.unsqueeze(0), ctx.probe_input_grad(cons.node)]).flatten(0, 1)
            dz = dz.unsqueeze(0).expand(k + 1, *dz.shape).flatten(0, 1)
        prod = dz * g
        if layout.axis != 1:
            prod = prod.movedim(layout.axis, 1)
        prod = prod.sum(tuple(range(2, prod.dim()))) if prod.dim() > 2 else prod  # (N, features)
        if seg.offset or seg.width * seg.inner != prod.shape[1]:
            prod = prod[:, seg.offset : seg.offset + seg.width * seg.inner]
        if seg.inner > 1:
            prod = prod.reshape(prod.shape[0], seg.width, seg.inner).sum(-1)
        part = prod.T  # (width, N), or (width, (1 + K)·N) with probes
        if k:
            part = part.unflatten(1, (k + 1, -1)).transpose(1, 2)
        total = part if total is None else total + part
    if total is None:
        shape = (group.width, ctx.losses.shape[0]) + ((k + 1,) if k else ())
        return ctx.losses.new_zeros(shape)
    return total


def grad_dot(ctx: ScoreContext, dz: torch.Tensor, node: str) -> torch.Tensor:
    """Δz·g per sample at the output of ``node``, shape (N,), or (N, 1 + K) with curvature probes
    (Δz·g, then Δz·gₖ): for morphisms whose change adds to one node's output.

    >>> s = grad_dot(ctx, dz, "layer1_0_relu")
    """
    g = ctx.grad(node)
    if ctx.probes:
        g = torch.cat([g.unsqueeze(0), ctx.probe_grad(node)])  # (1 + K, N, ...)
        return (dz.unsqueeze(0) * g).reshape(g.shape[0], g.shape[1], -1).sum(-1).T
    return (dz * g).reshape(dz.shape[0], -1).sum(1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties broken by order).

    >>> spearman([0.1, 0.3, 0.2], [1.0, 3.0, 2.5])
    1.0
    """
    ra = torch.tensor(list(a)).argsort().argsort().double()
    rb = torch.tensor(list(b)).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def gn_estimate(s: torch.Tensor, losses: torch.Tensor, *, per_sample: bool,
                inv4l: torch.Tensor | None = None) -> torch.Tensor:
    """ΔL from s = Δz·g per site and sample, shape (sites, N) -> (sites,).

    Whole-batch: s̄ + s̄²/(4 L̂); per-sample: mean over n of sₙ + sₙ²/(4 Lₙ). ``inv4l``: 1/(4 Lₙ)
    computed once for a batch scored many times (the scoring pass passes it). With curvature
    probes s has shape (sites, N, 1 + K), Δz·g and then Δz·gₖ, and the estimate is the
    Gauss-Newton one, mean over n of sₙ,₀ + ½ Σₖ sₙ,ₖ² (the same per sample and whole-batch).

    >>> gn_estimate(s, ctx.losses, per_sample=True)
    """
    if s.dim() == 3:
        return _gauss_newton_per_sample(s).mean(dim=1)
    if per_sample:
        if inv4l is None:
            inv4l = 1.0 / (4 * losses.clamp_min(_MIN_LOSS))
        return (s + s * s * inv4l).mean(dim=1)
    mean = s.mean(dim=1)
    return mean + mean.pow(2) / (4 * losses.mean().clamp_min(_MIN_LOSS))


def _gauss_newton_per_sample(s: torch.Tensor) -> torch.Tensor:
    """sₙ,₀ + ½ Σₖ sₙ,ₖ² per site and sample, from s of shape (sites, N, 1 + K)."""
    return s[..., 0] + 0.5 * s[..., 1:].pow(2).sum(-1)


# -- the scoring pass -------------------------------------------------------------------------------
def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)  # one kernel for all θ tensors
    except (RuntimeError, TypeError):  # a torch or device without fused Adam
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _project(theta: torch.Tensor, radius: torch.Tensor) -> None:
    with torch.no_grad():
        norms = torch.linalg.vector_norm(theta.reshape(theta.shape[0], -1), dim=1)
        theta.mul_((radius / norms.clamp_min(1e-12)).clamp_max(1.0).view(-1, *([1] * (theta.dim() - 1))))


class Scorer:
    """The scoring pass one batch at a time: ``step(x, y)`` per batch, then ``finish()``.

    :func:`score` is this loop over batches; use a Scorer to interleave scoring with other work.
    ``only`` restricts scoring to those candidates (default: every candidate of ``morphisms``);
    ``init`` gives the θ some candidates start from (the others start where their morphism's
    ``init_theta`` puts them; each given θ is projected into its trust region).

    >>> scorer = Scorer(g, F.cross_entropy, ("split",))
    >>> for x, y in loader: scorer.step(x, y)
    >>> cands = scorer.finish()
    """

    def __init__(
        self,
        graph: MorphGraph,
        loss_fn: LossFn,
        morphisms: Sequence[str | Morphism] = ("split", "prune"),
        *,
        config: ScoreConfig | None = None,
        registry: Registry | None = None,
        only: Iterable[Candidate] | None = None,
        init: Mapping[Candidate, torch.Tensor] | None = None,
    ):
        self.graph, self.loss_fn = graph, loss_fn
        self.cfg = config or ScoreConfig()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        keep = None if only is None else set(only)
        self.plans: list[tuple[Morphism, list[Candidate], torch.Tensor, torch.Tensor]] = []
        self.alias_calls: set[str] = set()
        self.grad_nodes: set[str] = set()
        for spec in morphisms:
            m = resolve(spec, registry)
            if not isinstance(m, ScoredMorphism):
                why = getattr(m, "why_not_scored", "") or "it is no morphir.ScoredMorphism (it defines no local change)"
                raise MorphismError(f"morphism {m.name!r} cannot be scored: {why}")
            by_key: dict[Any, list[Candidate]] = defaultdict(list)
            for c in m.candidates(graph):
                if keep is None or c in keep:
                    by_key[m.batch_key(graph, c.site)].append(c)
            for group in by_key.values():
                sites = [c.site for c in group]
                theta = m.init_theta(graph, sites, self.cfg.trust, gen)
                radius = m.trust_radius(graph, sites, self.cfg.trust)
                if init:
                    given = [(j, init[c]) for j, c in enumerate(group) if c in init]
                    if given:
                        with torch.no_grad():
                            for j, t in given:
                                theta[j].copy_(t.reshape(theta[j].shape).to(theta))
                            _project(theta, radius)
                self.plans.append((m, group, theta, radius))
                self.alias_calls |= set(m.alias_calls(graph, sites))
                self.grad_nodes |= set(m.grad_nodes(graph, sites))
        learnable = [p[2].requires_grad_() for p in self.plans if p[0].learnable]
        self.opt = _adam(learnable, self.cfg.lr) if learnable else None
        self.capturer = Capturer(graph, grad_nodes=self.grad_nodes, alias_calls=self.alias_calls,
                                 curvature=self.cfg.curvature)
        self.memo: dict[Any, Any] = {}
        self.ema: list[torch.Tensor | None] = [None] * len(self.plans)
        self.fixed_sum: list[torch.Tensor] | None = None
        self.fixed_sumsq: list[torch.Tensor] | None = None
        self.fixed_count = 0  # samples (per-sample estimates) or batches behind fixed_sum
        self.fixed_steps = 0
        self.steps = 0

    def step(self, x: Any, y: Any, *, learn: bool = True) -> None:
        """One forward/backward of the network, the estimates of every candidate, one Adam step on θ.

        With ``learn=False`` θ stays fixed and the estimates are averaged instead (see ``final_pass``).
        """
        if not learn:
            self._fixed_step(x, y)
            return
        total = torch.zeros(())
        with eval_mode(self.graph.module):
            ctx = self.capturer(x, y, self.loss_fn, memo=self.memo)
            inv4l = 1.0 / (4 * ctx.losses.clamp_min(_MIN_LOSS))
            for i, (m, group, theta, _) in enumerate(self.plans):
                s = m.local_change(ctx, [c.site for c in group], theta)
                est = gn_estimate(s, ctx.losses, per_sample=self.cfg.per_sample, inv4l=inv4l)
                e = est.detach()
                self.ema[i] = e if self.ema[i] is None else self.cfg.ema * self.ema[i] + (1 - self.cfg.ema) * e
                if m.learnable:
                    total = total + est.sum()
        if self.opt is not None:
            self.opt.zero_grad()
            total.backward()
            self.opt.step()
            for m, _, theta, radius in self.plans:
                if m.learnable:
                    _project(theta, radius)
        self.steps += 1

    @torch.no_grad()
    def _fixed_step(self, x: Any, y: Any) -> None:
        with eval_mode(self.graph.module):
            ctx = self.capturer(x, y, self.loss_fn, memo=self.memo)
            if self.fixed_sum is None:
                self.fixed_sum = [ctx.losses.new_zeros(len(p[1]), dtype=torch.float64) for p in self.plans]
                self.fixed_sumsq = [ctx.losses.new_zeros(len(p[1]), dtype=torch.float64) for p in self.plans]
            inv4l = 1.0 / (4 * ctx.losses.clamp_min(_MIN_LOSS))
            for i, (m, group, theta, _) in enumerate(self.plans):
                s = m.local_change(ctx, [c.site for c in group], theta.detach())
                if s.dim() == 3:  # Gauss-Newton curvature: every sample's estimate
                    e = _gauss_newton_per_sample(s).double()
                    if not self.cfg.per_sample:
                        e = e.mean(dim=1, keepdim=True)
                elif self.cfg.per_sample:  # every sample's estimate: the mean and its standard error
                    e = (s + s * s * inv4l).double()
                else:  # one estimate per batch
                    e = gn_estimate(s, ctx.losses, per_sample=False).double().unsqueeze(1)
                self.fixed_sum[i] += e.sum(dim=1)
                self.fixed_sumsq[i] += e.pow(2).sum(dim=1)
            self.fixed_count += int(ctx.losses.numel()) if self.cfg.per_sample else 1
        self.fixed_steps += 1

    def finish(self) -> list[Candidate]:
        """Attach θ and the estimate to every candidate and to its nodes' metadata; return them."""
        if self.steps == 0 and self.fixed_steps == 0:
            raise MorphirError("score got no batches; pass a non-empty iterable of (x, y)")
        out: list[Candidate] = []
        self.graph.invalidate(SCORE_KEY)  # records of an earlier pass on this graph are stale now
        for i, (m, group, theta, _) in enumerate(self.plans):
            for j, c in enumerate(group):
                c.theta = theta[j].detach().clone()
                if self.fixed_steps:
                    n = self.fixed_count
                    mean = float(self.fixed_sum[i][j]) / n
                    var = max(float(self.fixed_sumsq[i][j]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
                    c.estimate = mean
                    c.extra["stderr"] = math.sqrt(var / n)
                else:
                    c.estimate = float(self.ema[i][j])
                out.append(c)
                record = {"morphism": c.name, "site": str(c.site), "estimate": c.estimate,
                          "delta_params": c.delta_params, "delta_flops": c.delta_flops}
                for node in m.site_nodes(self.graph, c.site):
                    existing = self.graph.node(node).meta.get(SCORE_KEY, [])
                    self.graph.set_meta(node, SCORE_KEY, [*existing, record])
        log.info("scored %d candidates over %d batches", len(out), self.steps)
        return out


def score(
    graph: MorphGraph,
    batches: Batches,
    loss_fn: LossFn,
    morphisms: Sequence[str | Morphism] = ("split", "prune"),
    *,
    config: ScoreConfig | None = None,
    registry: Registry | None = None,
    estimate_batches: Batches | None = None,
    init: Mapping[Candidate, torch.Tensor] | None = None,
) -> list[Candidate]:
    """Score every candidate of ``morphisms`` on ``graph``: learn θ, estimate ΔL, attach both.

    ``batches``: an iterable of ``(x, y)`` or a callable returning one (called once per epoch);
    ``loss_fn(output, y)``: a mean loss. ``morphisms``: Morphism instances, or names looked up in
    ``registry`` (``morphir.score`` defaults it to the built-ins). The network runs in eval mode;
    its weights and ``.grad`` are not touched. ``estimate_batches``: make the final pass over these instead (held-out
    batches: an estimate on the batches θ was learned on is biased towards gains that do not
    generalise). ``init``: the θ some candidates start from (see :class:`Scorer`; the ``gn``
    grower starts splits at splitting steepest descent's directions). Each candidate gets ``.theta``, ``.estimate`` (ΔL at that θ: the mean over a
    final pass with θ fixed, or the EMA over batches without ``final_pass``),
    ``.extra["stderr"]`` (the standard error of that mean, over samples, after a final pass),
    ``.delta_params`` and ``.delta_flops``, and the same record is written to
    ``node.meta["morphir.score"]`` of the nodes at its site (dropped by any later rewrite).

    >>> cands = morphir.score(g, lambda: train_loader, F.cross_entropy, config=morphir.ScoreConfig(epochs=2))
    """
    scorer = Scorer(graph, loss_fn, morphisms, config=config, registry=registry, init=init)
    for _ in range(scorer.cfg.epochs):
        for x, y in _batches(batches):
            scorer.step(x, y)
    if scorer.cfg.final_pass or estimate_batches is not None:
        for x, y in _batches(batches if estimate_batches is None else estimate_batches):
            scorer.step(x, y, learn=False)
    return scorer.finish()


# -- the brute-force reference ------------------------------------------------------------------------
def _mean_loss(graph: MorphGraph, batches: Batches, loss_fn: LossFn) -> float:
    return mean_loss(graph.module, _batches(batches), loss_fn)


def exact_delta_losses(graph: MorphGraph, cands: Sequence[Candidate], batches: Batches, loss_fn: LossFn) -> list[float]:
    """The exact loss change of each candidate with its θ: one expanded network per candidate.

    >>> exact = morphir.exact_delta_losses(g, cands, val_batches, F.cross_entropy)
    """
    base = _mean_loss(graph, batches, loss_fn)
    out = []
    for c in cands:
        theta = {c: c.theta} if c.theta is not None else None
        out.append(_mean_loss(apply(graph, [c], theta, verify=False), batches, loss_fn) - base)
    return out


def exact_delta_loss(graph: MorphGraph, candidate: Candidate, batches: Batches, loss_fn: LossFn) -> float:
    """The exact loss change of one candidate with its θ (its default θ if not scored).

    >>> morphir.exact_delta_loss(g, cands[0], val_batches, F.cross_entropy)
    """
    return exact_delta_losses(graph, [candidate], batches, loss_fn)[0]
