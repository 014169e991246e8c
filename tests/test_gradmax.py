"""GradMax: zero incoming weights, outgoing weights along the top singular vectors of M, σ'(0) = 1."""

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from growing import assert_same_run, grow_vgg19_and_resume
from morphir.data import digits_tensors
from morphir.passes.new_channels import locate, mean_norms, read_incoming, read_outgoing
from morphir.passes.gradmax import (
    GradMax,
    RightReLU,
    gradient_matrices,
    plain_relus,
    right_relu,
    silent_groups,
    top_directions,
)

BN_EPS = 1e-5


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 16, 10))


def digits(n: int = 64, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xt, yt, _, _ = digits_tensors(seed=0)
    return [(xt[start:start + n], yt[start:start + n])]


def trained(net: nn.Module) -> morphir.MorphGraph:
    """A few SGD steps, so gradients and batch statistics are not those of an initialisation."""
    xt, yt, _, _ = digits_tensors(seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for i in range(0, 256, 32):
        opt.zero_grad()
        F.cross_entropy(net(xt[i:i + 32]), yt[i:i + 32]).backward()
        opt.step()
    return morphir.trace(net.eval(), torch.zeros(1, 1, 8, 8))


def make_step(graph: morphir.MorphGraph, batches, **config) -> morphir.GrowthStep:
    return morphir.GrowthStep(graph, batches, None, batches, F.cross_entropy, morphir.GrowConfig(**config),
                              morphir.default_registry(), phase=1, seed=5)


def new_neurons(before: morphir.MorphGraph, growth: morphir.Growth):
    """Where each group's new neurons sit in ``growth.result.graph``."""
    counts: dict[str, int] = {}
    for c in growth.chosen:
        counts[c.site.anchor] = counts.get(c.site.anchor, 0) + 1
    return locate(before, growth.result, counts)


def train_grads(graph: morphir.MorphGraph, batches) -> morphir.MorphGraph:
    """A copy of ``graph`` holding the gradient of the mean loss over ``batches`` in train mode."""
    g = graph.copy()
    g.module.train()
    total = sum(len(y) for _, y in batches)
    for x, y in batches:
        (F.cross_entropy(g.module(x), y) * len(y) / total).backward()
    return g


# -- σ'(0) ---------------------------------------------------------------------------------------------
class FunctionalRelus(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = torch.relu(self.b(x))
        return self.head(self.c(x).relu())


def test_right_relu_keeps_every_value_and_passes_the_gradient_at_zero() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0], requires_grad=True)
    RightReLU()(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]
    x.grad = None
    nn.ReLU()(x).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]  # PyTorch's: a neuron at exactly 0 gets nothing

    for net in (conv_net(), FunctionalRelus()):
        shape = (1, 1, 8, 8) if isinstance(net, nn.Sequential) else (1, 4)
        g = morphir.trace(net.eval(), torch.zeros(shape))
        relus = plain_relus(g)
        r = right_relu(g)
        assert len(relus) == 2 + isinstance(net, FunctionalRelus) and not plain_relus(r) and right_relu(r) is r
        assert plain_relus(g) == relus  # the original graph is left as it was
        inputs = torch.randn(32, *shape[1:])
        inputs[0] = 0
        assert torch.equal(g.module(inputs), r.module(inputs))  # bitwise the same forward
        assert [(grp.name, grp.width, grp.growable, grp.nonlinear) for grp in g.groups] == \
            [(grp.name, grp.width, grp.growable, grp.nonlinear) for grp in r.groups]


# -- the matrix and the chosen directions ----------------------------------------------------------------
def test_outgoing_weights_are_the_top_singular_vectors_on_a_tiny_mlp() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    g = GradMax().prepare(morphir.trace(net, torch.zeros(1, 6)), None)
    x, y = torch.randn(48, 6), torch.randint(0, 4, (48,))
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]

    # brute force: for a new neuron j with incoming α = 0 and outgoing ω, ∂L/∂α = Σₙ (ωᵀgₙ) xₙ with gₙ
    # the gradient of the mean loss at sample n's logits, so M = Σₙ gₙ xₙᵀ
    logits = g.module(x).detach().requires_grad_()
    (gl,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    brute = gl.T @ x
    assert torch.allclose(gradient_matrices(g, batches, F.cross_entropy, ["0"])["0"], brute, atol=1e-6)
    u, s, _ = torch.linalg.svd(brute)

    growth = GradMax(scale=1.5, scale_method="fixed").grow(make_step(g, batches, top_fraction=0.3))
    slots = new_neurons(g, growth)["0"]
    assert slots.count == 3  # ceil(0.3 · 8)
    grown = growth.result.graph
    omega = read_outgoing(grown, slots)
    assert torch.count_nonzero(read_incoming(grown, slots)) == 0
    assert torch.allclose(omega.norm(dim=1), torch.full((3,), 1.5))
    assert torch.allclose((omega / 1.5 @ u[:, :3]).abs(), torch.eye(3), atol=1e-5)  # ± the top 3

    # the new incoming weights' gradient norms are σ₁, σ₂, σ₃ times ‖ω‖ ...
    grads = read_incoming(train_grads(grown, batches), slots, grad=True)
    assert torch.allclose(grads.norm(dim=1), 1.5 * s[:3], rtol=1e-4)
    # ... and no outgoing vector of the same norm does better than the top one (brute force on grown nets)
    cand = next(c for c in growth.chosen if c.site.index == 0)
    gen = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(20):
        w = torch.randn(g.outgoing_numel("0"), generator=gen)
        result = morphir.rewrite(g, [cand], {cand: cand.morphism.pack(g, "0", outgoing=1.5 * w / w.norm())})
        one = locate(g, result, {"0": 1})["0"]
        norms.append(float(read_incoming(train_grads(result.graph, batches), one, grad=True).norm()))
    assert max(norms) <= float(grads[0].norm()) * (1 + 1e-5)
    assert min(norms) < 0.9 * float(grads[0].norm())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_conv_matrix_is_the_documented_correlation_of_gradients_and_input_patches(mode: str) -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    torch.manual_seed(1)
    g = right_relu(morphir.trace(net.eval(), torch.zeros(1, 2, 6, 6)))
    x, y = torch.randn(24, 2, 6, 6), torch.randint(0, 5, (24,))

    m = copy.deepcopy(g.module).train(mode == "train")
    seen = {}
    m.get_submodule("3").register_forward_hook(lambda mod, inp, out: seen.setdefault("z", out))
    (gz,) = torch.autograd.grad(F.cross_entropy(m(x), y), seen["z"])  # g: at the consumer's output (N, 4, 6, 6)
    h = F.unfold(x, 3, padding=1)  # producer input patches, rows (c, a): (N, 18, 36)
    # consumer: ∂L/∂u[n, p] = Σ_{o,b} ω[o, b] g[n, o, p − b + 1], i.e. g's patches with the kernel flipped
    gp = F.unfold(gz, 3, padding=1).reshape(24, 4, 3, 3, 36).flip(2, 3).reshape(24, 36, 36)
    if mode == "train":  # an all-zero channel: batch variance 0, the gradient centred over batch and positions
        scale = (0 + BN_EPS) ** -0.5
        h = h - h.mean(dim=(0, 2), keepdim=True)
    else:  # fresh running statistics: mean 0, variance 1
        scale = (1 + BN_EPS) ** -0.5
    expected = scale * torch.einsum("nbp,nap->ba", gp, h)
    measured = gradient_matrices(g, [(x, y)], F.cross_entropy, ["0"], mode=mode)["0"]
    assert measured.shape == (36, 18)
    assert torch.allclose(measured, expected, atol=1e-5 * float(expected.abs().max()))
    # the probes in passes of at most 7 neurons per group give the same matrix (both groups at once)
    both = gradient_matrices(g, [(x, y)], F.cross_entropy, ["0", "3"], mode=mode, max_probes=7)
    assert torch.allclose(both["0"], measured, atol=1e-6 * float(expected.abs().max()))
    assert both["3"].shape == (g.outgoing_numel("3"), g.incoming_numel("3")) == (5 * 36, 3 * 9)


def test_top_directions_are_orthonormal_and_sign_fixed() -> None:
    m = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    vecs, sig = top_directions(m, 6)  # beyond the rank (5): a completed basis with σ = 0
    assert torch.allclose(vecs @ vecs.T, torch.eye(6), atol=1e-5)
    assert torch.allclose(sig[:5], torch.linalg.svdvals(m), atol=1e-5) and float(sig[5]) == 0
    assert all(float(v[v.abs().argmax()]) > 0 for v in vecs)
    with pytest.raises(morphir.MorphirError, match="dimension 7"):
        top_directions(m, 8)


# -- growth: exact, and the new neurons learn --------------------------------------------------------------
def test_gradmax_preserves_the_function_in_eval_and_train_mode() -> None:
    g = GradMax().prepare(trained(conv_net()), None)
    batches = digits()
    growth = GradMax().grow(make_step(g, batches))
    grown = growth.result.graph
    assert [grp.width for grp in grown.groups if grp.growable] == [4 + 2, 5 + 2]  # ceil(0.3 · width)
    slots = new_neurons(g, growth)
    for s in slots.values():
        assert torch.count_nonzero(read_incoming(grown, s)) == 0
        assert float(read_outgoing(grown, s).norm(dim=1).min()) > 0
    # the second group's new neurons do not read the first group's (the corner add_channel copies is zeroed)
    w = grown.submodule("4").weight.detach()
    assert torch.count_nonzero(w[5:, 4:]) == 0
    x = digits(128, start=300)[0][0]
    for train in (False, True):  # train mode: an all-zero channel's batch statistics are mean 0, variance 0
        a, b = copy.deepcopy(g.module).train(train), copy.deepcopy(grown.module).train(train)
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), atol=1e-6, rtol=0)


def test_new_neurons_get_the_predicted_gradient_and_move_in_training(caplog: pytest.LogCaptureFixture) -> None:
    plain = trained(conv_net())
    g = GradMax().prepare(plain, None)
    batches = digits()
    grower = GradMax()
    growth = grower.grow(make_step(g, batches))
    slots = new_neurons(g, growth)
    grads = train_grads(growth.result.graph, batches)
    matrices = gradient_matrices(g, batches, F.cross_entropy, list(slots))
    for name, s in slots.items():
        got = read_incoming(grads, s, grad=True).norm(dim=1)
        _, sigma = top_directions(matrices[name], s.count)
        assert float(got.min()) > 0
        assert torch.allclose(got, sigma * grower.scale * mean_norms(g, name)[1], rtol=1e-4)

    def train_some(graph: morphir.MorphGraph) -> morphir.MorphGraph:
        graph = graph.copy()
        opt = torch.optim.SGD(graph.module.parameters(), lr=0.01, momentum=0.9)
        morphir.train.train_epoch(graph.module, opt, digits(256, start=64), F.cross_entropy)
        return graph

    moved = train_some(growth.result.graph)
    for s in slots.values():
        assert float(read_incoming(moved, s).norm(dim=1).min()) > 1e-3

    # with PyTorch's ReLU (σ'(0) = 0) the same neurons never receive a gradient and never move
    with caplog.at_level(logging.WARNING, logger="morphir.passes.gradmax"):
        dead = GradMax().grow(make_step(plain, batches))
    assert "never receive a gradient" in caplog.text
    dead_slots = new_neurons(plain, dead)
    stuck = train_some(dead.result.graph)
    for s in dead_slots.values():
        assert torch.count_nonzero(read_incoming(train_grads(dead.result.graph, batches), s, grad=True)) == 0
        assert torch.count_nonzero(read_incoming(stuck, s)) == 0


def test_gradmax_works_through_pooling_flatten_concat_and_depthwise_followers() -> None:
    import models  # tests/models.py (conftest puts tests/ on the path)

    for name in ("concat_residual_depthwise", "flatten_linear"):
        ctor, shape = models.EXTRA_MODELS[name]
        torch.manual_seed(0)
        g = GradMax().prepare(morphir.trace(ctor().eval(), torch.zeros(1, *shape)), None)
        x = torch.randn(32, *shape)
        y = torch.randint(0, 3, (32,))
        growth = GradMax().grow(make_step(g, [(x, y)]))
        grown = growth.result.graph
        for train in (False, True):
            a, b = copy.deepcopy(g.module).train(train), copy.deepcopy(grown.module).train(train)
            with torch.no_grad():
                assert torch.allclose(a(x), b(x), atol=1e-5, rtol=0), name
        slots = new_neurons(g, growth)
        assert len(slots) >= 2
        grads = train_grads(grown, [(x, y)])
        matrices = gradient_matrices(g, [(x, y)], F.cross_entropy, list(slots))
        for group, s in slots.items():
            _, sigma = top_directions(matrices[group], s.count)
            want = sigma * GradMax().scale * mean_norms(g, group)[1]
            got = read_incoming(grads, s, grad=True).norm(dim=1)
            assert torch.allclose(got, want, atol=1e-4 * float(want.max())), (name, group)
    # flatten_linear's hidden layer feeds 3 logits: at most 3 orthonormal outgoing directions, not ceil(0.3 · 12) = 4
    assert slots["fc1"].count == 3


def test_groups_whose_activation_is_not_zero_at_zero_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 3))
    g = GradMax().prepare(morphir.trace(net, torch.zeros(1, 4)), None)
    assert silent_groups(g, ["0", "2"]) == ["0"]  # a zero-incoming neuron outputs sigmoid(0) = 1/2
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with caplog.at_level(logging.WARNING, logger="morphir.passes.gradmax"):
        growth = GradMax().grow(make_step(g, [(x, y)]))
    assert "group 2" in caplog.text
    assert {c.site.anchor for c in growth.chosen} == {"0"} and len(growth.chosen) == 2
    assert torch.allclose(growth.result.graph.module(x), g.module(x), atol=1e-6, rtol=0)


# -- end to end ------------------------------------------------------------------------------------------
def test_gradmax_grows_vgg19_end_to_end_and_resumes(tmp_path: Path) -> None:
    full, resumed = grow_vgg19_and_resume(GradMax(), tmp_path)
    first, last = full.metrics
    assert abs(first["loss_jump"]) <= 1e-6  # function-preserving
    assert first["gradmax_grad_norm"] > 0
    assert all(w == 16 for w in first["widths"].values())
    assert set(last["widths"].values()) == {16 + 5}  # ceil(0.3 · 16) per group (the last hidden feeds 10 logits)
    assert last["params"] > first["params"] and full.graph.num_params() == last["params"]
    assert not plain_relus(full.graph)  # GradMax.prepare ran: σ'(0) = 1 for the whole run

    assert_same_run(full, resumed)
