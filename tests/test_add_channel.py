"""add_channel: a new neuron with its own incoming and outgoing weights, and the graph's outgoing view."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphir
from morphir.passes import AddChannel


def _graph(bias: bool = True) -> morphir.MorphGraph:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, 3))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
    return morphir.trace(m.eval(), torch.randn(1, 1, 8, 8))


def test_outgoing_weights_are_what_consumers_read_from_a_channel() -> None:
    g = _graph()
    (name, shape), = g.outgoing_shapes("0")
    assert (name, tuple(shape)) == ("4", (3, 64))
    u = g.outgoing_weights("0", 2)
    assert torch.equal(u.view(3, 64), g.submodule("4").weight[:, 128:192])
    assert torch.equal(g.unflatten_outgoing("0", u)["4"], u.view(3, 64))
    with pytest.raises(morphir.AnalysisError, match="outgoing weights"):
        g.unflatten_outgoing("0", u[:-1])


def test_new_channel_computes_its_own_neuron_exactly() -> None:
    g = _graph()
    morph = AddChannel()
    cand = next(c for c in morphir.candidates(g, morph) if c.site.anchor == "0" and c.site.index == 1)
    v, u = torch.randn(g.incoming_numel("0")), torch.randn(g.outgoing_numel("0"))
    x = torch.randn(5, 1, 8, 8)

    silent = morphir.apply(g, [cand], {cand: morph.pack(g, "0", incoming=v)})  # outgoing 0: checked exact
    assert silent.num_params() - g.num_params() == cand.delta_params == 9 + 1 + 2 + 64 * 3
    assert torch.allclose(silent.module(x), g.module(x), atol=1e-6)

    grown = morphir.apply(g, [cand], {cand: morph.pack(g, "0", incoming=v, outgoing=u)}, verify=False)
    bn = grown.submodule("1")
    assert tuple(float(t[-1]) for t in (bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var)) == (1, 0, 0, 1)
    assert float(grown.submodule("0").bias.detach()[-1]) == 0.0
    h = F.relu(F.conv2d(x, v.view(1, 1, 3, 3), padding=1) / (1 + bn.eps) ** 0.5)  # the fresh batch norm
    expected = g.module(x) + F.linear(h.flatten(1), u.view(3, 64))
    assert torch.allclose(grown.module(x), expected, atol=1e-5)
    got_v, got_u = morph.unpack(grown, "0", torch.cat([grown.incoming_weights("0", 4), grown.outgoing_weights("0", 4)]))
    assert torch.allclose(got_v, v) and torch.allclose(got_u, u)


def test_pack_checks_sizes() -> None:
    g = _graph()
    with pytest.raises(ValueError, match="incoming and 192 outgoing"):
        AddChannel().pack(g, "0", incoming=torch.zeros(3))


def test_several_new_channels_in_chained_groups_at_once_preserve_at_zero_outgoing() -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    g = morphir.trace(m, torch.randn(1, 6))
    morph = AddChannel()
    cands = [c for c in morphir.candidates(g, morph) if c.site.index in (0, 2)]
    thetas = {c: morph.pack(g, c.site.anchor, incoming=torch.randn(g.incoming_numel(c.site.anchor))) for c in cands}
    grown = morphir.apply(g, cands, thetas)  # verified exact by the engine
    assert [grp.width for grp in grown.groups if grp.growable] == [7, 6]


class ReadTwice(nn.Module):
    """``h + h → max-pool → flatten`` and ``h → depthwise → flatten``, concatenated into one Linear: the
    linear reads the group at two places (4 and 16 features per channel), and a batch norm after
    ``cat([h, h])`` carries it twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.dw = nn.Conv2d(3, 3, 1, groups=3)
        self.norm = nn.BatchNorm2d(6)
        self.fc = nn.Linear(3 * 4 + 3 * 16 + 6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        twice = self.norm(torch.cat([h, h], 1)).mean((2, 3))
        y = torch.cat([torch.flatten(F.max_pool2d(h + h, 2), 1), torch.flatten(self.dw(h), 1), twice], 1)
        return self.fc(y)


def test_a_group_read_at_several_places_gets_each_of_its_new_weights() -> None:
    torch.manual_seed(0)
    g = morphir.trace(ReadTwice().eval(), torch.randn(2, 2, 4, 4))
    assert [(c.module, c.segment.inner) for c in g.group("conv").consumers] == [("fc", 4), ("fc", 16), ("fc", 1),
                                                                               ("fc", 1)]
    morph = AddChannel()
    cand = next(c for c in morphir.candidates(g, morph) if c.site.anchor == "conv")
    v, u = torch.randn(g.incoming_numel("conv")), torch.randn(g.outgoing_numel("conv"))
    assert u.numel() == 2 * (4 + 16 + 1 + 1)
    morphir.apply(g, [cand], {cand: morph.pack(g, "conv", incoming=v)})  # outgoing 0: verified exact
    grown = morphir.apply(g, [cand], {cand: morph.pack(g, "conv", incoming=v, outgoing=u)}, verify=False)
    assert torch.allclose(grown.incoming_weights("conv", 3), v)
    assert torch.allclose(grown.outgoing_weights("conv", 3), u)  # every place it is read, in order
    norm = grown.submodule("norm")  # fresh statistics at both places the batch norm carries the channel
    assert norm.num_features == 8
    assert norm.running_mean[[3, 7]].tolist() == [0.0, 0.0] and norm.running_var[[3, 7]].tolist() == [1.0, 1.0]
