"""Splitting steepest descent (passes/s2d.py): the splitting matrix against the real loss, the
smoothed ReLU, the line search's guarantee, the grower's selection, and a growth run."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from morphir.passes.s2d import (
    SplittingSteepestDescent,
    second_derivative,
    split_line_search,
    splitting_matrices,
)
from morphir.train import fit


def mean_loss(graph: morphir.MorphGraph, batches) -> float:
    module = graph.module.eval()
    with torch.no_grad():
        total = sum(float(F.cross_entropy(module(x), y)) * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def smooth_conv_net(act: nn.Module) -> morphir.MorphGraph:
    """conv → batch norm (non-trivial affine and statistics) → act → avg pool → linear, in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), act, nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(5 * 4 * 4, 3)).double()
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(32, 2, 8, 8, dtype=torch.double))
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-0.5, 0.5)
    return morphir.trace(net.eval(), torch.zeros(1, 2, 8, 8, dtype=torch.double))


def smooth_mlp(act: nn.Module) -> morphir.MorphGraph:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).double()
    return morphir.trace(net.eval(), torch.zeros(1, 4, dtype=torch.double))


@pytest.mark.parametrize("build,act,shape", [
    (smooth_conv_net, nn.Tanh(), (2, 8, 8)),
    (smooth_conv_net, nn.Softplus(beta=2.0), (2, 8, 8)),
    (smooth_mlp, nn.Tanh(), (4,)),
    (smooth_mlp, nn.GELU(), (4,)),
])
def test_splitting_matrix_is_the_second_difference_of_the_real_loss(build, act, shape) -> None:
    g = build(act)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, *shape, generator=gen, dtype=torch.double), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(2)]
    group = next(grp.name for grp in g.groups if grp.growable and grp.nonlinear)
    sm = splitting_matrices(g, batches, F.cross_entropy)[group]
    assert sm.bandwidth is None  # a smooth activation: its exact σ''
    base = mean_loss(g, batches)
    eps = 1e-3
    checked = 0
    for c in morphir.candidates(g, "split"):
        i = c.site.index
        random_v = torch.randn(sm.directions.shape[1], generator=gen, dtype=torch.double)
        for v in (sm.directions[i], random_v / random_v.norm()):
            fd = (mean_loss(morphir.apply(g, [c], {c: eps * v}, verify=False), batches) - base) / eps**2
            predicted = sm.predicted_delta(i, v)  # ½ vᵀ S v
            assert fd == pytest.approx(predicted, rel=2e-3, abs=1e-6), (i, fd, predicted)
            checked += 1
        # the eigenvector of λ_min: ½ λ_min, and no direction curves the loss down more
        assert sm.predicted_delta(i, sm.directions[i]) == pytest.approx(0.5 * float(sm.eigenvalues[i]), rel=1e-9)
        assert sm.predicted_delta(i, random_v / random_v.norm()) >= 0.5 * float(sm.eigenvalues[i]) - 1e-12
    assert checked == 2 * g.group(group).width


def test_relu_dirac_is_a_gaussian_kernel_that_predicts_the_real_loss_change() -> None:
    # σ'' of ReLU smoothed at bandwidth h is the N(0, h²) density: the second derivative of
    # the Gaussian-smoothed ReLU u·Φ(u/h) + h·φ(u/h)
    u = torch.linspace(-1, 1, 41, dtype=torch.double)
    h = 0.3
    kernel = second_derivative(None, u, kinks=[(0.0, 1.0)], bandwidth=h)
    normal = torch.distributions.Normal(0.0, 1.0)
    smoothed = lambda t: t * normal.cdf(t / h) + h * normal.log_prob(t / h).exp()  # noqa: E731
    step = 1e-3
    numeric = (smoothed(u + step) - 2 * smoothed(u) + smoothed(u - step)) / step**2
    assert torch.allclose(kernel, numeric, rtol=1e-4, atol=1e-6)
    relu6 = second_derivative(None, torch.tensor([0.0, 6.0], dtype=torch.double), kinks=[(0.0, 1.0), (6.0, -1.0)],
                              bandwidth=1.0)
    assert relu6.tolist() == pytest.approx([1 / math.sqrt(2 * math.pi), -1 / math.sqrt(2 * math.pi)], rel=1e-6)
    assert torch.allclose(second_derivative(torch.tanh, u), -2 * torch.tanh(u) / torch.cosh(u) ** 2, atol=1e-12)

    # with many samples the smoothed S predicts a ReLU split's real loss change (within 15 %)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    g = morphir.trace(net.eval(), torch.zeros(1, 3, dtype=torch.double))
    x = torch.randn(40000, 3, dtype=torch.double)
    y = (x[:, 0] * x[:, 1] > 0).long()
    batches = [(x[i : i + 4000], y[i : i + 4000]) for i in range(0, 40000, 4000)]
    sm = splitting_matrices(g, batches, F.cross_entropy)["0"]
    assert sm.bandwidth is not None and bool((sm.bandwidth > 0).all())
    assert bool((sm.eigenvalues < 0).all())
    base = mean_loss(g, batches)
    for c in morphir.candidates(g, "split"):
        i = c.site.index
        for eps in (0.1, 0.3):
            theta = eps * sm.weight_norms[i] * sm.directions[i]
            real = mean_loss(morphir.apply(g, [c], {c: theta}, verify=False), batches) - base
            assert real < 0
            assert sm.predicted_delta(i, theta) == pytest.approx(real, rel=0.15), (i, eps)


# -- the grower on a trained vgg19 seed ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_step() -> morphir.GrowthStep:
    torch.manual_seed(0)
    data = morphir.load_data("digits", seed=0, batch_size=64)
    model = morphir.zoo.build("vgg19", (1, 8, 8), 10)
    fit(model, data.train, F.cross_entropy, epochs=1)
    g = morphir.trace(model, torch.zeros(1, 1, 8, 8))
    taken = list(itertools.islice(iter(data.train), 6))
    morphir.recalibrate_batch_norm(g.module, taken[:3])
    return morphir.GrowthStep(g, taken[:3], taken[3:], data.train, F.cross_entropy, morphir.GrowConfig(),
                              morphir.default_registry(), phase=1, seed=0)


def test_grower_splits_the_most_negative_eigenvalues_within_the_quota(vgg_step) -> None:
    step = vgg_step
    grower = SplittingSteepestDescent()
    chosen, dirs, curv, skipped = grower.directions(step)
    assert skipped == {}  # every vgg19 group is conv → batch norm → ReLU
    sms = splitting_matrices(step.graph, step.batches, F.cross_entropy)
    assert set(sms) == {c.site.anchor for c in step.candidates("split")}
    for group, sm in sms.items():
        negative = int((sm.eigenvalues < 0).sum())
        picked = sorted(c.site.index for c in chosen if c.site.anchor == group)
        assert len(picked) == step.quota(group, negative)
        expected = sorted(sm.eigenvalues.argsort()[: len(picked)].tolist())
        assert picked == expected
        for c in chosen:
            if c.site.anchor == group:
                w = step.graph.incoming_weights(group, c.site.index)
                assert float(dirs[c].norm()) == pytest.approx(float(w.norm()), rel=1e-5)
                assert curv[c] < 0

    growth = grower.grow(step)
    eps = growth.info["s2d_eps"]
    assert eps in grower.grid and growth.chosen == chosen
    held = step.all_batches()
    before = mean_loss(step.graph, held)
    after = mean_loss(morphir.apply(step.graph, growth.chosen, growth.thetas), held)
    assert after < before
    assert before - after == pytest.approx(growth.info["s2d_line_search_gain"], rel=1e-6)
    assert growth.estimated_gain == pytest.approx(-0.5 * eps**2 * sum(curv.values()), rel=1e-9)

    # at ε = 0 the same splits preserve the function (the engine checks it on its probe batch too)
    zero = morphir.apply(step.graph, growth.chosen, {c: 0 * t for c, t in growth.thetas.items()})
    err, tol = morphir.output_mismatch(step.graph, zero)
    assert err <= tol
    assert zero.num_params() > step.graph.num_params()
    x = step.batches[0][0]
    assert torch.allclose(zero.module.eval()(x), step.graph.module.eval()(x), atol=1e-5)


def test_line_search_never_returns_a_step_that_raises_the_loss(vgg_step) -> None:
    step = vgg_step
    chosen, dirs, _, _ = SplittingSteepestDescent().directions(step)
    batches = step.batches
    base = mean_loss(step.graph, batches)
    # along the s2d directions some ε lowers the loss; the one returned is measured on a real rewrite
    ls = split_line_search(step.graph, chosen, dirs, batches, F.cross_entropy)
    assert ls.eps > 0 and ls.base == pytest.approx(base, rel=1e-6)
    real = mean_loss(morphir.apply(step.graph, chosen, {c: ls.eps * d for c, d in dirs.items()}), batches)
    assert real < base and real == pytest.approx(ls.losses[ls.eps], rel=1e-6)
    assert ls.losses[ls.eps] == min(ls.losses.values())
    # random directions, and steps far too large: whatever comes back does not raise the loss
    gen = torch.Generator().manual_seed(0)
    for grid in ((0.05, 0.3, 1.0), (20.0, 50.0)):
        noise = {c: d.norm() * F.normalize(torch.randn(d.shape, generator=gen), dim=0) for c, d in dirs.items()}
        ls = split_line_search(step.graph, chosen, noise, batches, F.cross_entropy, grid=grid)
        assert ls.eps == 0.0 or ls.losses[ls.eps] < ls.base
        assert ls.gain >= 0.0
    assert ls.eps == 0.0 and ls.losses[50.0] > ls.base  # 50 ‖w‖ wrecks the network: nothing accepted
    growth = SplittingSteepestDescent(grid=(50.0,)).grow(step)
    assert growth.chosen == [] and growth.info["s2d_eps"] == 0.0 and growth.info["s2d_candidates"] > 0


class Mixed(nn.Module):
    """A residual stream (two producers), a depthwise stage with a second activation, and a plain
    conv → batch norm → ReLU6 layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.outer = nn.Conv2d(4, 4, 3, padding=1)
        self.point = nn.Conv2d(4, 6, 1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.outer(F.relu6(self.bn(self.inner(x)))))
        x = torch.tanh(self.depthwise(F.relu(self.point(x))))
        return self.head(x.flatten(1))


def test_groups_it_cannot_model_are_skipped_with_the_reason() -> None:
    torch.manual_seed(0)
    g = morphir.trace(Mixed().eval(), torch.zeros(1, 1, 8, 8))
    skipped: dict[str, str] = {}
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    sms = splitting_matrices(g, [(x, y)], F.cross_entropy, skipped=skipped)
    assert set(sms) == {"inner"}
    assert sms["inner"].bandwidth is not None  # ReLU6: two kinks, smoothed
    assert set(skipped) == {"stem", "point"}
    assert "2 producers" in skipped["stem"] and "second activation" in skipped["point"]
    with pytest.raises(morphir.MorphirError, match="grid"):
        SplittingSteepestDescent(grid=(0.0, 0.1))


def test_growth_run_with_s2d_grows_and_never_raises_the_loss_at_a_step() -> None:
    torch.manual_seed(0)
    data = morphir.load_data("digits", seed=0, batch_size=64)
    seed = morphir.zoo.build("vgg19", (1, 8, 8), 10)
    res = morphir.grow(seed, data.train, data.val, F.cross_entropy, method=SplittingSteepestDescent(), phases=2,
                       phase_epochs=1, progress=False)
    first = res.metrics[0]
    assert first["applied"].get("split", 0) > 0
    assert res.graph.num_params() > res.seed_params
    assert sum(first["widths"].values()) + first["applied"]["split"] == sum(res.metrics[1]["widths"].values())
    assert first["s2d_eps"] > 0 and first["estimated_gain"] > 0
    assert first["loss_jump"] <= 1e-6
    assert first["loss_jump"] == pytest.approx(-first["s2d_line_search_gain"], abs=1e-6)
    assert math.isfinite(res.metrics[-1]["val_loss"])
    # the log replays: the seed plus the logged splits has the grown shapes
    seed_graph = morphir.trace(seed, torch.zeros(1, 1, 8, 8))
    replayed = morphir.replay_entries(seed_graph, res.log[0], morphir.default_registry())
    assert replayed.num_params() == res.graph.num_params()


def test_gn_starts_each_split_at_its_splitting_direction(vgg_step) -> None:
    from morphir.passes.gn import GaussNewton, split_init

    step = vgg_step
    init = split_init(step.graph, step.batches, F.cross_entropy, trust=0.3)
    sms = splitting_matrices(step.graph, step.batches, F.cross_entropy)
    negative = {(g, i) for g, sm in sms.items() for i in range(len(sm.eigenvalues)) if float(sm.eigenvalues[i]) < 0}
    assert {(c.site.anchor, c.site.index) for c in init} == negative and len(negative) > 50
    for c, theta in list(init.items())[:20]:
        sm = sms[c.site.anchor]
        w = float(sm.weight_norms[c.site.index])
        assert float(theta.norm()) == pytest.approx(0.15 * w, rel=1e-5)  # half the trust radius
        cos = float(theta.double() @ sm.directions[c.site.index]) / float(theta.norm())
        assert abs(cos) == pytest.approx(1.0, abs=1e-5)
    # the grower hands them to the scoring pass (with lr 0, θ stays where it starts) ...
    frozen = dataclasses.replace(step, config=morphir.GrowConfig(score=morphir.ScoreConfig(lr=0.0)))
    scored = {c: c.theta for c in GaussNewton(init="s2d")._score(frozen, step.graph) if c.name == "split"}
    assert all(torch.allclose(scored[c], init[c]) for c in init)
    # ... and with init="random", or θ="random" (the ablation), they start at random
    rand = {c: c.theta for c in GaussNewton(init="random")._score(frozen, step.graph) if c.name == "split"}
    ablation = dataclasses.replace(frozen, config=dataclasses.replace(frozen.config, theta="random"))
    rand2 = {c: c.theta for c in GaussNewton()._score(ablation, step.graph) if c.name == "split"}
    for other in (rand, rand2):
        cosines = [abs(float(other[c].double() @ init[c].double())) / float(other[c].norm() * init[c].norm()) for c in init]
        assert max(cosines) < 0.9
    with pytest.raises(morphir.MorphirError, match="init"):
        GaussNewton(init="zeros")
