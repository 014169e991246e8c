"""What the scoring pass reads, and the arithmetic morphisms compute their local change with: one
forward/backward per batch captures the activations and per-sample gradients at the nodes morphisms
read (:class:`Capturer`, :class:`ScoreContext`); :func:`propagate` carries a change through a
group's elementwise ops and :func:`dot_at_consumers` / :func:`grad_dot` turn it into Δz·g.

>>> ctx = capture(g, x, y, F.cross_entropy, grad_nodes=["relu_3"])
>>> ctx.value("relu_3").shape, ctx.grad("relu_3").shape
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.func import hessian, vmap

from morphir.batches import as_args, eval_mode
from morphir.channels import ChannelGroup
from morphir.errors import MorphismError, TrainingError
from morphir.graph import MorphGraph

__all__ = ["CURVATURES", "Capturer", "LossFn", "ScoreContext", "capture", "curvature_factors", "dot_at_consumers",
           "grad_dot", "per_sample_losses", "propagate"]

log = logging.getLogger(__name__)


LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


CURVATURES = ("rank-one", "gauss-newton")


MAX_CURVATURE_OUTPUTS = 64  # output features per sample up to which the exact Gauss-Newton term is used


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
