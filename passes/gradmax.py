"""``gradmax``: new neurons whose first gradient step is as large as possible (Evci et al., ICLR 2022,
"GradMax: Growing Neural Networks using Gradient Information").

A new neuron j of a group starts with **zero incoming weights** αⱼ, so the function is unchanged
whatever its outgoing weights ωⱼ are, and ωⱼ is chosen to maximise ‖∂L/∂αⱼ‖ at fixed ‖ωⱼ‖.

**The matrix.** At αⱼ = 0 the new channel is 0 everywhere, so the forward pass, and with it the
gradient g at every consumer's output, does not depend on ωⱼ; the backward pass from g to αⱼ is
linear in ωⱼ. Hence ∂L/∂αⱼ = Mᵀωⱼ for a fixed matrix M (``outgoing_numel × incoming_numel``):
the top ``quota`` left singular vectors of M maximise Σⱼ‖Mᵀωⱼ‖² over orthonormal ωⱼ, and
‖∂L/∂αⱼ‖ = σⱼ‖ωⱼ‖. For a dense layer (h: the producer's input, g: the gradient at the consumer's
output) M = σ'(0)·E[g hᵀ]. For a conv producer (kernel K₁, input channels c) feeding a conv
consumer (kernel K₂, output channels o), with zero padding, unit stride and no pooling between,
row (o, b) and column (c, a) of M (a ∈ K₁, b ∈ K₂ kernel offsets) are

    M[(o, b), (c, a)] = σ'(0) · s · Σₙ Σₚ g[n, o, p − b] · h[n, c, p + a]

summed over samples n and positions p of the new channel (indices outside the maps read 0):
∂L/∂(new channel at p) = Σ_{o,b} ω[o, b] g[n, o, p − b] (the consumer's transposed conv) and
∂L/∂α[c, a] = Σₚ δ(p) h[n, c, p + a] (the producer's weight gradient, δ: the gradient at the new
channel's pre-activation = σ'(0)·s × the former), so M sums g and h over
every pair of positions one kernel offset apart on each side: the (K₁+K₂−1)² "combined kernel"
correlation of the official code, cut into K₁ × K₂ blocks. A batch norm after the producer
multiplies by s = 1/√(var + ε) of its fresh statistics in eval mode; in train mode (what the next
SGD step sees) an all-zero channel has batch variance 0, so s = 1/√ε (316× the eval value for
ε = 1e-5) and δ is centred over the batch and positions, which is the same as centring h's
patches (Σ (δ − δ̄) h = Σ δ (h − h̄)). Pooling, strides, several producers or
consumers, flattens and concatenations change the index sets. Rather than special-casing each,
:func:`gradient_matrices` measures M with the network's own autograd: a *probe* network with one
new neuron per basis vector eⱼ of the outgoing weights (incoming 0) gives row j of M as the
gradient of that neuron's incoming weights, for every group at once (groups whose producer is
another's consumer go in separate passes, so probes never read probes).

**σ'(0).** PyTorch's ReLU has derivative 0 at 0, so a neuron whose pre-activation is exactly 0
never receives a gradient and M = 0. The official code (google-research/growneuron) uses
``relu1 = tf.math.maximum(x, 0)``, whose gradient at 0 is 1 ("This has grad(f(0))=1 instead of
0"). ReLU's subdifferential at 0 is [0, 1]; picking 1 changes no forward value. :class:`RightReLU`
does that exactly (``torch.clamp(x, min=0)``: bitwise the same forward as ``relu``, gradient 1 at
0), and :meth:`GradMax.prepare` (called by :func:`morphir.grow` before training starts, and again
on resume) swaps every ReLU of the graph for it (:func:`right_relu`). Existing neurons only differ
where a pre-activation is exactly 0, which batch-normalised real data almost never gives.

**Batch norm.** ``add_channel``'s fresh batch norm (γ = 1, β = 0, mean 0, var 1) maps the all-zero
pre-activation to 0 in eval mode, and in train mode the batch statistics of an all-zero channel
are mean 0 and variance 0, so (0 − 0)/√(0 + ε)·1 + 0 = 0 as well: the grown network computes
the same function in both modes. A new neuron b that reads a new neuron a of the group before it
(a *corner* weight, which ``add_channel`` copies from a's outgoing weight to b's reference channel)
would not start with zero incoming weights, and its path would add to a's gradient; GradMax sets
those corners to 0, so each new neuron's first gradient is exactly Mᵀω.

**‖ω‖.** The official code scales ω to a fixed norm (0.5) in networks without batch norm. With a
batch norm after the producer, the first SGD step takes the new channel from 0 to a batch-normalised,
unit-variance feature whatever the step size (its batch variance was 0), so ‖ω‖ is the size of
that jump in the function rather than of a gradual start: the default is 0.05 × the group's mean
outgoing norm. Measured once on VGG-19 (16 channels per layer) on digits, 3 phases of 3 epochs:
validation accuracy 0.40 at 0.5, 0.90 at 0.1, 0.05, 0.02 and 0.005 (random growth: 0.91).

>>> morphir.grow(model, train, val, F.cross_entropy, method=GradMax(), phases=3)
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from morphir.api import (
    Candidate,
    GrowConfig,
    Grower,
    Growth,
    GrowthStep,
    MorphGraph,
    MorphirError,
    log_entry,
    rewrite,
)
from morphir.passes.new_channels import (
    add_neurons,
    call,
    chunks,
    locate,
    mean_norms,
    read_incoming,
    sample_weights,
    sites_by_group,
    zero_corners,
)
from morphir.passes.add_channel import AddChannel

__all__ = ["GradMax", "RightReLU", "right_relu", "plain_relus", "silent_groups", "gradient_matrices", "top_directions"]

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


class RightReLU(nn.ReLU):
    """ReLU whose derivative at 0 is 1 (the right derivative); the forward is bitwise ``relu``.

    >>> x = torch.zeros(3, requires_grad=True); RightReLU()(x).sum().backward(); x.grad
    tensor([1., 1., 1.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp_(x, min=0) if self.inplace else torch.clamp(x, min=0)


def _is_relu_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def plain_relus(graph: MorphGraph) -> list[str]:
    """Nodes of ``graph`` that apply PyTorch's ReLU (derivative 0 at 0).

    >>> plain_relus(g)        # ['features_0_2', ...]; [] after right_relu(g)
    """
    gm = graph.module
    return [n.name for n in gm.graph.nodes if _is_relu_call(gm, n)]


def right_relu(graph: MorphGraph) -> MorphGraph:
    """A copy of ``graph`` with every ReLU replaced by one whose derivative at 0 is 1: ``nn.ReLU``
    modules by :class:`RightReLU`, ``F.relu``/``torch.relu``/``.relu()`` calls by
    ``torch.clamp(x, min=0)``. Every forward value is unchanged; returns ``graph`` itself when it
    has no ReLU left. An in-place functional relu whose input is read elsewhere is left as it is.

    >>> g = right_relu(g); plain_relus(g)
    []
    """
    if not plain_relus(graph):
        return graph
    out = graph.copy()
    gm = out.module
    swapped: set[str] = set()
    for node in list(gm.graph.nodes):
        if not _is_relu_call(gm, node):
            continue
        if node.op == "call_module":
            target = str(node.target)
            if target not in swapped:
                old = gm.get_submodule(target)
                parent, _, attr = target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, RightReLU(inplace=old.inplace))
                swapped.add(target)
            continue
        inplace = node.target in (torch.relu_, "relu_") or bool(node.kwargs.get("inplace", False)) or (
            node.op == "call_function" and node.target is F.relu and len(node.args) > 1 and bool(node.args[1]))
        src = node.args[0]
        if inplace and isinstance(src, fx.Node) and len(src.users) > 1:
            log.warning("right_relu: in-place relu at node %s writes a tensor read elsewhere; left as it is", node.name)
            continue
        if node.op == "call_function":
            node.target = torch.clamp
        else:
            node.target = "clamp"
        node.args = (src,)
        node.kwargs = {"min": 0.0}
    gm.graph.lint()
    gm.recompile()
    out.invalidate()
    out.propagate_shapes()
    return out


def _colours(graph: MorphGraph, groups: Sequence[str]) -> list[list[str]]:
    """Groups split so that no module is a producer of one group of a part and a consumer of another
    (probes of one pass then never read probes)."""
    produced = {p.module: g for g in groups for p in graph.group(g).producers}
    clash: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        for c in graph.group(g).consumers:
            h = produced.get(c.module)
            if h is not None and h != g:
                clash[g].add(h)
                clash[h].add(g)
    parts: list[list[str]] = []
    for g in groups:
        for part in parts:
            if not clash[g] & set(part):
                part.append(g)
                break
        else:
            parts.append([g])
    return parts


def silent_groups(graph: MorphGraph, groups: Iterable[str]) -> list[str]:
    """The groups among ``groups`` where a new neuron with zero incoming weights outputs exactly 0 at
    every consumer, in eval and in train mode (on the graph's probe batch): where GradMax's neurons
    leave the function unchanged. Not so where the activation is not 0 at 0 (sigmoid, softplus) or
    a follower shifts the channel.

    >>> silent_groups(g, ["0", "2"])      # ['0'] when group "2" goes through a sigmoid
    """
    groups = list(dict.fromkeys(groups))
    if not groups:
        return []
    probe, slots = add_neurons(graph, {g: torch.zeros(1, graph.incoming_numel(g) + graph.outgoing_numel(g))
                                       for g in groups})
    gm = probe.module
    layouts = probe.analysis.consumer_layouts
    loud: set[str] = set()
    seen: dict[str, torch.Tensor] = {}
    hooks = [gm.get_submodule(b.module).register_forward_pre_hook(
        lambda mod, args, name=b.module: seen.__setitem__(name, args[0].detach()))
        for s in slots.values() for b in s.outgoing]
    try:
        for train in (False, True):
            gm.train(train)
            seen.clear()
            with torch.no_grad():
                gm(*probe.probe_inputs)
            for g, s in slots.items():
                for b in s.outgoing:
                    x = seen[b.module].movedim(layouts[b.module].axis, 0)
                    if bool(torch.any(x[b.cols] != 0)):
                        loud.add(g)
    finally:
        for h in hooks:
            h.remove()
    return [g for g in groups if g not in loud]


def gradient_matrices(
    graph: MorphGraph,
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    groups: Iterable[str],
    *,
    mode: Literal["train", "eval"] = "train",
    max_probes: int = 256,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """GradMax's M for each group: row j is ∂L/∂α of a new neuron with zero incoming weights α and
    outgoing weights eⱼ (the j-th basis vector of ``graph.outgoing_weights``' layout), so a new
    neuron with outgoing ω gets ∂L/∂α = Mᵀω. L is the mean loss over ``batches``, with the network
    in ``mode`` (train: batch statistics, as the next SGD step sees it) and σ'(0) as ``graph``'s
    activations define it (0 for PyTorch's ReLU: see :func:`right_relu`). Measured by autograd on
    probe networks, at most ``max_probes`` new neurons per group per pass; ``graph`` is unchanged.

    >>> M = gradient_matrices(right_relu(g), batches, F.cross_entropy, ["features.0.0"])["features.0.0"]
    """
    if mode not in ("train", "eval"):
        raise MorphirError(f"mode must be 'train' or 'eval', got {mode!r}")
    groups = list(dict.fromkeys(groups))
    shares = sample_weights(batches)
    out = {g: torch.zeros(graph.outgoing_numel(g), graph.incoming_numel(g)) for g in groups}
    for part in _colours(graph, groups):
        pieces = {g: list(chunks(graph.outgoing_numel(g), max_probes)) for g in part}
        for k in range(max(len(p) for p in pieces.values())):
            todo = {g: p[k] for g, p in pieces.items() if k < len(p)}
            neurons = {}
            for g, rows in todo.items():
                n_in, n_out = graph.incoming_numel(g), graph.outgoing_numel(g)
                theta = torch.zeros(len(rows), n_in + n_out)
                theta[torch.arange(len(rows)), n_in + torch.tensor(list(rows))] = 1.0
                neurons[g] = theta
            probe, slots = add_neurons(graph, neurons)
            gm = probe.module
            gm.train(mode == "train")
            wanted = {b.module for s in slots.values() for b in s.incoming}
            for name, p in gm.named_parameters():
                p.requires_grad_(name.rpartition(".")[0] in wanted and name.endswith("weight"))
                p.grad = None
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(seed)
                for (x, y), share in zip(batches, shares):
                    (loss_fn(call(gm, x), y) * share).backward()
            for g, rows in todo.items():
                out[g][list(rows)] = read_incoming(probe, slots[g], grad=True).detach().float()
    return out


def top_directions(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` left singular vectors of ``matrix`` as rows (unit norm, sign fixed so each
    vector's largest entry is positive) and their singular values (0 beyond the rank).

    >>> omega, sigma = top_directions(M, 3)     # ‖Mᵀ omega[j]‖ == sigma[j]
    """
    if k > matrix.shape[0]:
        raise MorphirError(f"{k} orthonormal directions asked for in a space of dimension {matrix.shape[0]}")
    m = matrix.double()
    u, s, _ = torch.linalg.svd(m, full_matrices=k > min(m.shape))
    vecs = u[:, :k].T.clone()
    sig = torch.zeros(k, dtype=torch.float64)
    sig[: min(k, s.numel())] = s[:k]
    for row in vecs:
        if row[row.abs().argmax()] < 0:
            row.neg_()
    return vecs.float(), sig.float()


class GradMax(Grower):
    """Add ``quota`` neurons per group with zero incoming weights and outgoing weights along the top
    singular vectors of M (see the module docstring), of norm ``scale`` × the group's mean outgoing
    norm (``scale_method="mean_norm"``) or ``scale`` (``"fixed"``). ``mode``: the network mode M is
    measured in (``"train"``: what the next SGD step sees); ``max_probes``: probe neurons per group
    and pass.

    >>> growth = GradMax().grow(step)      # the function is unchanged; new neurons' gradients maximal
    """

    name = "gradmax"
    description = "new neurons with zero incoming weights and outgoing weights maximising their gradient (GradMax)"
    preserving = True

    def __init__(self, *, scale: float = 0.05, scale_method: Literal["mean_norm", "fixed"] = "mean_norm",
                 mode: Literal["train", "eval"] = "train", max_probes: int = 256):
        if scale_method not in ("mean_norm", "fixed"):
            raise MorphirError(f"scale_method must be 'mean_norm' or 'fixed', got {scale_method!r}")
        if mode not in ("train", "eval"):
            raise MorphirError(f"mode must be 'train' or 'eval', got {mode!r}")
        if not scale > 0 or max_probes < 1:
            raise MorphirError(f"scale must be positive and max_probes at least 1, got {scale} and {max_probes}")
        self.scale, self.scale_method, self.mode, self.max_probes = scale, scale_method, mode, max_probes

    def morphisms(self) -> list[AddChannel]:
        return [AddChannel()]

    def prepare(self, graph: MorphGraph, config: GrowConfig) -> MorphGraph:
        """The graph with every ReLU's derivative at 0 set to 1 (:func:`right_relu`; same forward).

        >>> g = GradMax().prepare(g, config)
        """
        return right_relu(graph)

    def grow(self, step: GrowthStep) -> Growth:
        graph = step.graph
        by_group = sites_by_group(step)
        if not by_group:
            return Growth()
        if plain_relus(graph):
            log.warning("gradmax: the graph still uses PyTorch's ReLU (derivative 0 at 0), so new neurons with zero "
                        "incoming weights will never receive a gradient; grow through morphir.grow (which calls "
                        "GradMax.prepare) or convert the model with right_relu first")
        quiet = silent_groups(graph, by_group)
        for g in by_group:
            if g not in quiet:
                log.warning("gradmax: a new neuron of group %s with zero incoming weights is not 0 at its consumers "
                            "(its activation or a follower is not 0 at 0); the group is not grown", g)
        by_group = {g: cands for g, cands in by_group.items() if g in quiet}
        if not by_group:
            return Growth()
        matrices = gradient_matrices(right_relu(graph), step.batches, step.loss_fn, by_group, mode=self.mode,
                                     max_probes=self.max_probes, seed=step.seed)
        morph = AddChannel()
        chosen: list[Candidate] = []
        thetas: dict[Candidate, torch.Tensor] = {}
        counts: dict[str, int] = {}
        first_step = 0.0
        for g, cands in by_group.items():
            # at most outgoing_numel orthonormal directions exist: a group whose consumers read few
            # weights per channel (e.g. a last hidden layer before 3 outputs) gets fewer neurons
            q = min(step.quota(g), len(cands), graph.outgoing_numel(g))
            omega, sigma = top_directions(matrices[g], q)
            norm = self.scale * (mean_norms(graph, g)[1] if self.scale_method == "mean_norm" else 1.0)
            for c, w in zip(cands[:q], omega):
                thetas[c] = morph.pack(graph, g, outgoing=w * norm)
                chosen.append(c)
            counts[g] = q
            first_step += float((sigma * norm).pow(2).sum())
            log.debug("gradmax %s: %d neurons, singular values %s", g, q, [round(float(s), 6) for s in sigma])
        result = rewrite(graph, chosen, thetas)
        zero_corners(result.graph, locate(graph, result, counts))
        return Growth(chosen=chosen, thetas=thetas, result=result, log=[log_entry(c, thetas[c]) for c in chosen],
                      info={"gradmax_grad_norm": math.sqrt(first_step)})
