"""Tracing: shapes on nodes, leaf policies, and clear errors for untraceable models."""

import pytest
import torch
import torch.nn as nn

import morphir


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_trace_records_shapes_and_runs() -> None:
    model = morphir.zoo.build("vgg19", (1, 8, 8))
    g = morphir.trace(model, torch.randn(1, 1, 8, 8))
    shapes = {n.name: g.shape(n) for n in g.module.graph.nodes if g.shape(n) is not None}
    assert shapes["features_0_0"] == torch.Size([1, 16, 8, 8])
    model.eval(), g.module.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model(x), g.module(x), atol=1e-6)
    assert g.probe_inputs[0].shape == (8, 1, 8, 8)


def test_untraceable_model_names_the_construct_line_and_remedy() -> None:
    with pytest.raises(morphir.TraceError) as info:
        morphir.trace(DataDependent(), torch.randn(1, 4))
    text = str(info.value)
    assert "control flow" in text and "test_trace.py" in text and "if x.sum() > 0" in text
    assert "leaf_modules" in text and "concrete_args" in text


def test_leaf_policy_keeps_untraceable_module_whole() -> None:
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x) * 2

    g = morphir.trace(Wrapper(), torch.randn(1, 4), leaf_modules=[DataDependent])
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == ["inner"]
    g = morphir.trace(Wrapper(), torch.randn(1, 4), leaf_policy=lambda m, name: name == "inner" or None)
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == ["inner"]


def test_wrong_example_shape_is_a_trace_error() -> None:
    with pytest.raises(morphir.TraceError, match="do not fit"):
        morphir.trace(nn.Linear(4, 2), torch.randn(1, 5))


def test_trace_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = morphir.trace(model, torch.randn(1, 4))
    morphir.apply(g, morphir.candidates(g, "split"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_traced_graph_modules_save_and_load_even_with_string_annotations(tmp_path) -> None:
    # the zoo's forward methods use `from __future__ import annotations`: fx would keep
    # 'torch.Tensor' as a string global that torch.save cannot pickle
    g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8), 10), torch.zeros(1, 1, 8, 8))
    grown = morphir.apply(g, morphir.candidates(g, "split")[:3])
    path = tmp_path / "grown.pt"
    torch.save(grown.module, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), grown.module.eval()(x))
