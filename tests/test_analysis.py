"""Channel analysis: groups, index maps and the reasons groups cannot grow."""

import torch
import torch.nn as nn

import morphir
from conftest import build_graph


def test_resnet_residual_stream_is_one_growable_group_and_splitting_it_keeps_the_function() -> None:
    g = build_graph("zoo:resnet20")
    stream = g.group("stem.0")
    # the stem conv and the last conv of each of the 3 blocks of stage 1 write the stream
    assert [p.module for p in stream.producers] == ["stem.0", "stages.0.0.conv2", "stages.0.1.conv2", "stages.0.2.conv2"]
    assert stream.growable and stream.nonlinear and stream.width == 16
    assert {"stages.0.0.conv1", "stages.0.1.conv1", "stages.0.2.conv1"} <= {c.module for c in stream.consumers}
    cands = [c for c in morphir.candidates(g, "split") if c.site.anchor == "stem.0"]
    assert len(cands) == 16
    g2 = morphir.apply(g, cands)
    err, tol = morphir.output_mismatch(g, g2)
    assert err <= tol
    assert g2.group("stem.0").width == 32
    for p in stream.producers:
        assert g2.submodule(p.module).out_channels == 32


def test_concat_places_groups_at_offsets() -> None:
    g = build_graph("zoo:densenet")
    layout = g.analysis.consumer_layouts["features.0.2.bottleneck.2"]
    # stem (16) then the growth (8) of the two dense layers before it
    assert [(s.group, s.offset, s.width) for s in layout.segments] == [
        ("stem", 0, 16), ("features.0.0.conv.2", 16, 8), ("features.0.1.conv.2", 24, 8)]
    assert layout.size == g.submodule("features.0.2.bottleneck.2").in_channels


def test_flatten_expands_a_channel_into_spatial_features_and_literal_views_follow() -> None:
    g = build_graph("flatten_linear")
    fc1 = [c for c in g.group("conv").consumers if c.module == "fc1"]
    assert fc1 and fc1[0].segment.inner == 16
    g2 = morphir.apply(g, [c for c in morphir.candidates(g, "split") if c.site.anchor == "conv"][:2])
    assert g2.submodule("fc1").in_features == (4 + 2) * 16
    assert "96" in g2.module.code  # the literal in x.view(-1, 64) was rewritten
    err, tol = morphir.output_mismatch(g, g2)
    assert err <= tol


def test_groups_that_cannot_grow_say_why() -> None:
    reasons = {
        "chunk": ("stem", "cuts the channels"),
        "grouped_conv": ("stem", "grouped conv"),
        "layernorm_residual": ("embed", "LayerNorm"),
    }
    for model, (group, text) in reasons.items():
        g = build_graph(model)
        grp = g.group(group)
        assert not grp.growable
        assert any(text in r for r in grp.blocked), grp.blocked
    # ... while the groups around them still grow
    assert build_graph("chunk").group("a").growable
    assert build_graph("layernorm_residual").group("up").growable


def test_gate_multiply_and_shared_input_tie_channels() -> None:
    gated = build_graph("gated_mul")
    grp = gated.group("value")
    assert [p.module for p in grp.producers] == ["value", "gate"] and grp.nonlinear
    shared = build_graph("shared_activation")
    assert {c.module for c in shared.group("stem").consumers} == {"left", "right"}
    assert [p.module for p in shared.group("left").producers] == ["left", "right"]


def test_module_called_twice_is_one_group() -> None:
    g = build_graph("shared_conv")
    grp = g.group("stem")
    assert [p.module for p in grp.producers] == ["stem", "shared"]
    assert "shared" in {c.module for c in grp.consumers}


class Mystery(nn.Module):
    def forward(self, x):
        return x.roll(1, dims=1)  # an op the analysis has no rule for


class WithMystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.m = Mystery()
        self.b = nn.Conv2d(4, 5, 3, padding=1)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.m(torch.relu(self.a(x)))))).mean((2, 3))


def test_unknown_ops_and_leaf_modules_block_their_groups_without_crashing() -> None:
    x = torch.randn(2, 3, 6, 6)
    g = morphir.trace(WithMystery(), x)
    assert not g.group("a").growable
    assert any("roll" in r for r in g.group("a").blocked)
    assert g.group("b").growable
    leaf = morphir.trace(WithMystery(), x, leaf_modules=[Mystery])
    assert any("module m (Mystery)" in r for r in leaf.group("a").blocked)
    assert [n.op for n in leaf.module.graph.nodes].count("call_module") == 4


def test_custom_channel_rule_makes_an_unknown_op_growable() -> None:
    rules = morphir.ChannelRules.default().with_module(Mystery, morphir.passthrough(nonlinear=False))
    g = morphir.trace(WithMystery(), torch.randn(2, 3, 6, 6), leaf_modules=[Mystery], rules=rules)
    assert g.group("a").growable


def test_group_costs_match_the_layers() -> None:
    g = build_graph("zoo:vgg19")
    grp = g.group("features.1.0")  # conv 16->16 3x3 (no bias) + BN, read by a conv 16->16 3x3
    conv = g.submodule("features.1.0")
    row = conv.weight[0].numel() + (1 if conv.bias is not None else 0)
    assert grp.params_per_channel == row + 2 + 16 * 9
    assert grp.flops_per_channel > 0
