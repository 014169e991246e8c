"""Tests for morphir.zoo: shapes, fx-traceability, determinism and architecture facts."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from morphir import zoo
from morphir.errors import LoadError, MorphirError

NAMES = ["densenet", "mobilenet_v1", "mobilenet_v2", "resnet20", "resnet50", "vgg19"]  # the conv nets; the mlp is tested below
SHAPES = [(1, 8, 8), (3, 16, 16), (3, 32, 32)]
CLASSES = [10, 7]
BATCH = 4


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_names_sorted_and_complete() -> None:
    assert zoo.names() == sorted([*NAMES, "mlp"])
    assert zoo.names() is not zoo.names()  # a fresh list each call


@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_trace_matches_eager(
    name: str, shape: tuple[int, int, int], num_classes: int
) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, input_shape=shape, num_classes=num_classes).eval()
    x = torch.randn(BATCH, *shape)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)
        traced_out = traced(x)
    assert eager.shape == (BATCH, num_classes)
    assert torch.isfinite(eager).all()
    assert traced_out.shape == eager.shape
    torch.testing.assert_close(traced_out, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, input_shape=(3, 16, 16), num_classes=7).train()
    out = model(torch.randn(BATCH, 3, 16, 16))
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_seed_makes_parameters_identical(name: str) -> None:
    torch.manual_seed(0)
    a = zoo.build(name, input_shape=(3, 16, 16))
    torch.manual_seed(0)
    b = zoo.build(name, input_shape=(3, 16, 16))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # And a different seed really gives different weights.
    torch.manual_seed(1)
    c = zoo.build(name, input_shape=(3, 16, 16))
    assert any(
        not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters())
    )


@pytest.mark.parametrize("name", NAMES)
def test_no_inplace_activations(name: str) -> None:
    model = zoo.build(name)
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            assert m.inplace is False


# --- vgg19 -----------------------------------------------------------------


def test_vgg19_has_16_convs_of_width_16() -> None:
    model = zoo.build("vgg19")
    convs = _convs(model)
    assert len(convs) == 16
    assert all(c.out_channels == 16 for c in convs)
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert _count(model, nn.BatchNorm2d) == 16
    assert _count(model, nn.ReLU) == 16


@pytest.mark.parametrize(
    ("shape", "pools", "in_features"),
    [
        ((1, 8, 8), 3, 16 * 1 * 1),  # 8 -> 4 -> 2 -> 1, last two stages unpooled
        ((3, 16, 16), 4, 16 * 1 * 1),
        ((3, 32, 32), 5, 16 * 1 * 1),
        ((3, 12, 20), 3, 16 * 1 * 2),  # pooling stops once H < 2; flatten keeps 1x2
    ],
)
def test_vgg19_pools_adapt_to_input(
    shape: tuple[int, int, int], pools: int, in_features: int
) -> None:
    model = zoo.build("vgg19", input_shape=shape)
    assert _count(model, nn.MaxPool2d) == pools
    assert _count(model, nn.AdaptiveAvgPool2d) == 0
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == in_features
    assert model(torch.randn(2, *shape)).shape == (2, 10)


# --- resnet20 --------------------------------------------------------------


def test_resnet20_conv_count() -> None:
    # 1 stem conv + 3 stages x 3 BasicBlocks x 2 convs = 19 3x3 convs, plus one
    # 1x1 projection shortcut at the start of stage 2 (16->32) and of stage 3
    # (32->64): 21 Conv2d in total. Stage 1 keeps 16 channels and stride 1 so
    # its shortcuts are identities.
    model = zoo.build("resnet20")
    convs = _convs(model)
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(convs) == 21
    assert len(three) == 19
    assert len(one) == 2
    assert [(c.in_channels, c.out_channels, c.stride) for c in one] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert model.classifier.in_features == 64


def test_resnet20_uses_residual_add_and_mean_pool() -> None:
    graph = torch.fx.symbolic_trace(zoo.build("resnet20")).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    means = [n for n in graph.nodes if n.op == "call_method" and n.target == "mean"]
    assert len(adds) == 9  # one per BasicBlock
    assert len(means) == 1


def test_resnet20_keeps_stride_one_on_1x1_input() -> None:
    model = zoo.build("resnet20", input_shape=(3, 1, 1))
    assert all(c.stride == (1, 1) for c in _convs(model))
    assert model.eval()(torch.randn(2, 3, 1, 1)).shape == (2, 10)


# --- mobilenets ------------------------------------------------------------


def test_mobilenet_v1_has_depthwise_convs() -> None:
    model = zoo.build("mobilenet_v1")
    depthwise = [c for c in _convs(model) if c.groups > 1]
    assert len(depthwise) == 6
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert all(c.kernel_size == (3, 3) for c in depthwise)
    assert model.stem[0].out_channels == 32


@pytest.mark.parametrize(("shape", "downsamplings"), [((1, 8, 8), 3), ((3, 2, 2), 1), ((3, 1, 1), 0)])
def test_mobilenet_v1_downsamplings_bounded(shape: tuple[int, int, int], downsamplings: int) -> None:
    model = zoo.build("mobilenet_v1", input_shape=shape)
    assert sum(c.stride == (2, 2) for c in _convs(model)) == downsamplings
    assert model.eval()(torch.randn(2, *shape)).shape == (2, 10)


def test_mobilenet_v2_residuals_and_relu6() -> None:
    model = zoo.build("mobilenet_v2")
    graph = torch.fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 3  # blocks 1, 3 and 5 keep stride 1 and channels
    assert _count(model, nn.ReLU6) > 0
    assert any(c.groups > 1 and c.groups == c.in_channels for c in _convs(model))


# --- densenet --------------------------------------------------------------


def test_densenet_forward_concatenates() -> None:
    model = zoo.build("densenet")
    graph = torch.fx.symbolic_trace(model).graph
    cats = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 6  # 2 dense blocks x 3 layers
    # stem 16 + 3*8 = 40 -> transition 20 -> + 3*8 = 44 features.
    assert model.classifier.in_features == 44
    assert _count(model, nn.AvgPool2d) == 1


# --- width override --------------------------------------------------------


def test_width_override_changes_conv_widths() -> None:
    assert {c.out_channels for c in _convs(zoo.build("vgg19", width=8))} == {8}
    assert sorted({c.out_channels for c in _convs(zoo.build("resnet20", width=8))}) == [8, 16, 32]
    assert _convs(zoo.build("mobilenet_v1", width=16))[0].out_channels == 16
    assert max(c.out_channels for c in _convs(zoo.build("mobilenet_v1", width=16))) == 64
    assert _convs(zoo.build("mobilenet_v2", width=32))[0].out_channels == 32
    dense = zoo.build("densenet", width=32)  # growth 16: 32 + 48 = 80 -> 40 -> 88
    assert _convs(dense)[0].out_channels == 32
    assert dense.classifier.in_features == 88


@pytest.mark.parametrize("name", NAMES)
def test_width_override_runs_and_traces(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, input_shape=(3, 8, 8), num_classes=3, width=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x), atol=1e-5, rtol=0)
    assert min(c.out_channels for c in _convs(model)) >= 1


# --- errors ----------------------------------------------------------------


def test_unknown_name_raises_load_error_listing_names() -> None:
    with pytest.raises(LoadError) as info:
        zoo.build("alexnet")
    message = str(info.value)
    assert "alexnet" in message
    for name in NAMES:
        assert name in message
    assert isinstance(info.value, MorphirError)


@pytest.mark.parametrize(
    "shape",
    [(3, 32), (3, 32, 32, 1), (0, 8, 8), (3, -1, 8), (3, 8.0, 8), (True, 8, 8), "abc", None],
)
def test_bad_input_shape_raises_value_error(shape: object) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        zoo.build("vgg19", input_shape=shape)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_bad_num_classes_raises_value_error(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("resnet20", num_classes=num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [0, -1, 1.5])
def test_bad_width_raises_value_error(width: object) -> None:
    with pytest.raises(ValueError, match="width"):
        zoo.build("densenet", width=width)  # type: ignore[arg-type]


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        zoo._BUILDERS["x"] = nn.Linear  # type: ignore[index]


def test_mlp_takes_any_input_shape_and_its_widths() -> None:
    torch.manual_seed(0)
    mlp = zoo.build("mlp", (20,), 10, widths=(8,))
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [8, 10]
    assert _count(mlp, nn.BatchNorm1d) == 1 and mlp(torch.randn(4, 20)).shape == (4, 10)
    images = zoo.build("mlp", (1, 8, 8), 3, widths=(16, 16))
    assert images(torch.randn(2, 1, 8, 8)).shape == (2, 3) and _count(images, nn.Linear) == 3
    assert [m.out_features for m in zoo.build("mlp", (5,), 2, width=7).modules() if isinstance(m, nn.Linear)] == [7, 2]
    with pytest.raises(ValueError, match="widths"):
        zoo.build("mlp", (5,), 2, widths=(0,))
    with pytest.raises(ValueError, match="widths is for the mlp"):
        zoo.build("vgg19", (1, 8, 8), 2, widths=(4,))
