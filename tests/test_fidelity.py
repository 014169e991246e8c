"""The traced graph is the model: mode-dependent code stays live, and anything else that differs is a
TraceError at trace time naming where, never a later error that blames a morphism."""

import pytest
import torch
import torch.nn as nn

import morphir
from lookalikes import (
    AuxHeads,
    BatchNormAct2d,
    EfficientNetLike,
    ModeBlindDrop,
    SDPAttention,
    StochasticDepth,
    TimmLike,
)


def same_in_both_modes(model: nn.Module, g: morphir.MorphGraph, x: torch.Tensor) -> None:
    """The graph computes the model's output in eval mode and, under one random state, in train mode."""
    model = model.eval()
    gm = g.module.eval()
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))
        for train in (True,):
            model.train(train), gm.train(train)
            torch.manual_seed(5)
            want = model(x)
            torch.manual_seed(5)
            assert torch.equal(gm(x), want)


def test_stochastic_depth_stays_live_in_a_model_traced_in_training_mode() -> None:
    torch.manual_seed(0)
    model = EfficientNetLike(p=0.5)  # in training mode, as a freshly built model is
    g = morphir.trace(model, torch.randn(2, 3, 8, 8))
    assert g.fidelity.leaves == ("blocks.0.stochastic_depth", "blocks.1.stochastic_depth")
    assert g.fidelity.eval_error == 0.0 and g.fidelity.train_error == 0.0
    targets = [n.target for n in g.module.graph.nodes if n.op == "call_module"]
    assert "blocks.0.stochastic_depth" in targets  # a leaf that reads the module's mode when it runs
    same_in_both_modes(model, g, torch.randn(6, 3, 8, 8))
    # stochastic depth scales whole samples: the residual stream through it stays growable
    assert g.group("stem.0").growable, g.group("stem.0").blocked
    grown = morphir.apply(g, morphir.candidates(g, "split"))
    assert grown.group("stem.0").width == 16


def test_stochastic_depth_frozen_by_fx_is_a_trace_error_naming_it() -> None:
    torch.manual_seed(0)
    trace_through = lambda m, name: False if isinstance(m, StochasticDepth) else None  # noqa: E731 - fx's default
    with pytest.raises(morphir.TraceError) as info:
        morphir.trace(EfficientNetLike(p=0.5), torch.randn(2, 3, 8, 8), leaf_policy=trace_through)
    text = str(info.value)
    assert "eval mode" in text and "'blocks.0.stochastic_depth' (StochasticDepth)" in text
    assert "leaf_modules" in text


def test_batch_norm_act_keeps_its_training_branch_and_its_channels() -> None:
    torch.manual_seed(0)
    model = TimmLike()
    g = morphir.trace(model, torch.randn(2, 3, 6, 6))
    assert g.fidelity.leaves == ("bn1", "bn2", "bn3")
    same_in_both_modes(model, g, torch.randn(4, 3, 6, 6))
    # a batch norm followed by its activation: per-channel parameters, nonlinear when it has one
    assert g.group("conv1").growable and g.group("conv1").nonlinear
    assert g.group("conv2").growable and g.group("conv2").nonlinear
    assert [f.module for f in g.group("conv2").followers] == ["bn2"]
    grown = morphir.apply(g, morphir.candidates(g, "split"))
    assert grown.submodule("bn2").num_features == 24 and grown.submodule("bn2").running_mean.shape == (24,)
    # in train mode the leaf still updates its running statistics, as the model does
    gm = grown.module.train()
    before = gm.get_submodule("bn1").running_mean.clone()
    gm(torch.randn(4, 3, 6, 6))
    assert not torch.equal(before, gm.get_submodule("bn1").running_mean)


def test_batch_norm_act_traced_through_is_a_trace_error_naming_it() -> None:
    torch.manual_seed(0)
    through = lambda m, name: False if isinstance(m, BatchNormAct2d) else None  # noqa: E731
    with pytest.raises(morphir.TraceError, match=r"submodule 'bn1' \(BatchNormAct2d\)"):
        morphir.trace(TimmLike(), torch.randn(2, 3, 6, 6), leaf_policy=through)
    with pytest.raises(morphir.TraceError, match="train mode"):  # traced in eval mode: train mode differs
        morphir.trace(TimmLike().eval(), torch.randn(2, 3, 6, 6), leaf_policy=through)


def test_a_root_whose_own_code_depends_on_the_mode_is_refused() -> None:
    with pytest.raises(morphir.TraceError, match="AuxHeads.forward reads self.training"):
        morphir.trace(AuxHeads(), torch.randn(1, 3, 8, 8))
    with pytest.raises(morphir.TraceError, match="reads self.training"):  # in eval mode too: train mode differs
        morphir.trace(AuxHeads().eval(), torch.randn(1, 3, 8, 8))
    assert morphir.trace(nn.Linear(3, 2), torch.randn(2, 3), check=False).fidelity is None


def test_reading_the_mode_without_effect_keeps_the_module_traced() -> None:
    g = morphir.trace(ModeBlindDrop(p=0.0), torch.randn(2, 4))
    assert g.fidelity.leaves == ()
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == ["fc"]


def test_python_arguments_with_defaults_are_fixed_unless_given() -> None:
    torch.manual_seed(0)
    model = SDPAttention()
    x = torch.randn(2, 4, 5)
    g = morphir.trace(model, x)
    assert g.fidelity.fixed_args == ("attn_mask", "is_causal")
    assert [n.name for n in g.module.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(g.module(x), model(x))
    causal = morphir.trace(model, x, concrete_args={"is_causal": True})
    assert causal.fidelity.fixed_args == ("attn_mask",)
    assert torch.allclose(causal.module(x), model(x, is_causal=True), atol=1e-6)
    assert not torch.allclose(causal.module(x), model(x), atol=1e-3)


def test_fidelity_is_checked_on_every_zoo_model() -> None:
    for name in morphir.zoo.names():
        torch.manual_seed(0)
        g = morphir.trace(morphir.zoo.build(name, (3, 16, 16), 10), torch.randn(1, 3, 16, 16))
        assert g.fidelity is not None and g.fidelity.eval_error == 0.0, name
        assert g.fidelity.train_error == 0.0, name  # batch of one: train mode checked on the probe batch


def test_train_mode_not_checked_is_said() -> None:
    class NoTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

        def train(self, mode: bool = True):  # a module that refuses training
            if mode:
                raise RuntimeError("inference only")
            return super().train(False)

    g = morphir.trace(NoTraining().eval(), torch.randn(2, 3))
    assert g.fidelity.train_error is None and "train mode not checked" in g.fidelity.notes[0]
    assert g.fidelity.eval_error == 0.0


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, ids):
        return self.fc(self.embed(ids).mean(1))


def test_probe_batch_is_never_degenerate() -> None:
    zeros = torch.zeros(1, 7, dtype=torch.long)
    g = morphir.trace(TokenModel(), zeros)  # all-zero ids: the probe draws from the embedding's range
    ids = g.probe_inputs[0]
    assert ids.min() >= 0 and ids.max() <= 49 and len(ids.unique()) > 10

    class Indexer(nn.Module):
        def forward(self, i):
            return (i.float() * 2).sum(1, keepdim=True)

    with pytest.raises(morphir.TraceError, match="same in every sample"):
        morphir.trace(Indexer(), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(morphir.TraceError, match="NaN or infinite"):
        morphir.trace(nn.Linear(3, 2), torch.randn(1, 3), probe_inputs=(torch.full((4, 3), float("nan")),))
    with pytest.raises(morphir.TraceError, match="same in every sample"):
        morphir.trace(nn.Linear(3, 2), torch.randn(1, 3), probe_inputs=(torch.ones(4, 3),))


def test_a_channel_count_read_as_a_number_blocks_its_group() -> None:
    # `b, n, c = x.shape` then `y.reshape(b, n, c)` of another tensor: widening x would break y's reshape
    g = morphir.trace(SDPAttention(), torch.randn(2, 4, 5))
    assert not g.group("embed").growable
    assert "its channel count is read as a number at node getattr_1" in g.group("embed").blocked
    # the batch size read the same way is harmless
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))

    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).reshape(x.shape[0], -1)

    assert morphir.trace(Batched(), torch.randn(2, 3)).group("net.0").growable
