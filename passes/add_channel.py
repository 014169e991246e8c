"""``add_channel``: a new neuron in a group, with its own incoming and outgoing weights.

θ is the new channel's incoming weights (all producers, as :meth:`MorphGraph.incoming_weights`)
followed by its outgoing weights (all consumers, as :meth:`MorphGraph.outgoing_weights`). The
new channel starts fresh: producer biases 0, a batch norm after it at its initial state
(γ = 1, β = 0, mean 0, variance 1). With zero outgoing weights nothing downstream reads it, so
the rewrite is exact at θ = 0 and for any θ whose outgoing half is zero: that is the ``random``
grower's neuron (random incoming, zero outgoing); ``gradmax`` uses the other half (zero
incoming, outgoing from the gradient). A site is a group and a channel beside which the new one
is appended (per-channel values that are not set here, e.g. a depthwise follower's filter, are
copied from that channel).

>>> m = AddChannel()
>>> site = m.sites(g).__next__()
>>> theta = m.pack(g, site.anchor, incoming=torch.randn(g.incoming_numel(site.anchor)))
>>> g2 = morphir.apply(g, [c], {c: theta})           # one more channel, the function unchanged
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from morphir.api import ChannelCopy, MorphGraph, Morphism, Rewriter, Site

__all__ = ["AddChannel", "fresh_rows"]


def fresh_rows(graph: MorphGraph, group: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per-channel values of a newly initialised channel of ``group``: producer biases 0, batch
    norms at their initial state, depthwise convolutions the identity filter (a 1 at the centre, so
    the channel passes through them unchanged); other followers keep the copied channel's values.

    >>> fresh_rows(g, "features.0")   # {'features.0.1': {'weight': 1, 'bias': 0, ...}, ...}
    """
    grp = graph.group(group)
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for p in grp.producers:
        if getattr(graph.submodule(p.module), "bias", None) is not None:
            rows[p.module] = {"bias": torch.zeros(1)}
    for f in grp.followers:
        mod = graph.submodule(f.module)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            vals: dict[str, torch.Tensor] = {}
            if mod.affine:
                vals.update(weight=torch.ones(1), bias=torch.zeros(1))
            if mod.track_running_stats and mod.running_mean is not None:
                vals.update(running_mean=torch.zeros(1), running_var=torch.ones(1))
            if vals:
                rows[f.module] = vals
        elif isinstance(mod, nn.modules.conv._ConvNd):
            kernel = torch.zeros(mod.weight.shape[1:])
            kernel[tuple(k // 2 for k in kernel.shape)] = 1.0
            vals = {"weight": kernel}
            if mod.bias is not None:
                vals["bias"] = torch.zeros(1)
            rows[f.module] = vals
    return rows


class AddChannel(Morphism):
    """Append a new channel to group ``site.anchor``: θ = (incoming weights, outgoing weights)."""

    name = "add_channel"
    description = "add a new neuron: θ = its incoming then outgoing weights (exact while the outgoing ones are 0)"
    why_not_scored = ("a new neuron's θ is chosen by its grower (random, gradmax, firefly), not learned by the "
                      "Gauss-Newton pass: at θ = 0 both halves of the neuron are zero, so Δz·g and its gradient vanish")

    def sites(self, graph: MorphGraph) -> Iterable[Site]:
        for grp in graph.groups:
            if grp.growable and grp.nonlinear and grp.consumers:
                yield from (Site(grp.name, c) for c in range(grp.width))

    def theta_shape(self, graph: MorphGraph, site: Site) -> torch.Size:
        return torch.Size([graph.incoming_numel(site.anchor) + graph.outgoing_numel(site.anchor)])

    def cost(self, graph: MorphGraph, site: Site) -> tuple[int, int]:
        return graph.group(site.anchor).cost_of_adding(1)

    def pack(self, graph: MorphGraph, group: str, incoming: torch.Tensor | None = None,
             outgoing: torch.Tensor | None = None) -> torch.Tensor:
        """θ from the new channel's flat incoming and outgoing weights (either None: zeros).

        >>> AddChannel().pack(g, "features.0", incoming=v)            # outgoing 0: exact
        """
        n_in, n_out = graph.incoming_numel(group), graph.outgoing_numel(group)
        inc = torch.zeros(n_in) if incoming is None else incoming.detach().reshape(-1).float().cpu()
        out = torch.zeros(n_out) if outgoing is None else outgoing.detach().reshape(-1).float().cpu()
        if inc.numel() != n_in or out.numel() != n_out:
            raise ValueError(f"group {group!r} has {n_in} incoming and {n_out} outgoing weights per channel, "
                             f"got {inc.numel()} and {out.numel()}")
        return torch.cat([inc, out])

    def unpack(self, graph: MorphGraph, group: str, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat incoming and outgoing weights in θ.

        >>> v, u = AddChannel().unpack(g, "features.0", theta)
        """
        n_in = graph.incoming_numel(group)
        return theta[:n_in], theta[n_in:]

    def rewrite(self, rw: Rewriter, items: Sequence[tuple[Site, torch.Tensor]]) -> bool:
        graph = rw.graph
        for site, theta in items:
            incoming, outgoing = self.unpack(graph, site.anchor, theta)
            w = graph.incoming_weights(site.anchor, site.index)
            delta = graph.unflatten_incoming(site.anchor, incoming.to(w) - w)
            copies = (ChannelCopy(),
                      ChannelCopy(delta=delta, scale=0.0, rows=fresh_rows(graph, site.anchor),
                                  outgoing=graph.unflatten_outgoing(site.anchor, outgoing)))
            rw.set_copies(site.anchor, site.index, copies, origin=f"{self.name}@{site}")
        return bool(items)
