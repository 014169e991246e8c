"""Gauss-Newton scoring: exactness where the theory says so, gradients, metadata, no side effects."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from morphir.scoring import capture


def regression_net(act: type[nn.Module] = nn.ReLU, dtype=torch.float32) -> tuple[morphir.MorphGraph, list]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 1)).to(dtype)
    x = torch.randn(32, 4, dtype=dtype)
    y = torch.randn(32, 1, dtype=dtype)
    return morphir.trace(net, x[:1]), [(x, y)]


def test_estimate_is_exact_for_a_loss_quadratic_in_z_with_rank_one_hessian() -> None:
    # the paper's Theorem 2 case: the split channel's activation z feeds a linear readout u = c·z + d
    # and L = (u - y)², so per sample L(z + Δz) = L + g·Δz + (g·Δz)²/(4L) exactly
    graph, batches = regression_net()
    cands = morphir.score(graph, batches, F.mse_loss, morphisms=("split", "prune"),
                          config=morphir.ScoreConfig(lr=0.0, per_sample=True))
    exact = morphir.exact_delta_losses(graph, cands, batches, F.mse_loss)
    assert len(cands) == 12
    for cand, truth in zip(cands, exact):
        assert cand.estimate == pytest.approx(truth, abs=1e-4), cand
    assert max(abs(t) for t in exact) > 1e-3  # the θ are live: the test would notice a wrong sign or scale


def test_whole_batch_estimate_is_the_papers_formula() -> None:
    s = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    losses = torch.tensor([2.0, 4.0])
    whole = morphir.gn_estimate(s, losses, per_sample=False)
    per = morphir.gn_estimate(s, losses, per_sample=True)
    assert whole.tolist() == pytest.approx([-1.0 + 1.0 / 12, 0.5 + 0.25 / 12])
    assert per.tolist() == pytest.approx([(1 + 1 / 8 - 3 + 9 / 16) / 2, (0.5 + 0.25 / 8 + 0.5 + 0.25 / 16) / 2])


def test_gradient_of_the_estimate_matches_finite_differences() -> None:
    graph, batches = regression_net(nn.Tanh, torch.float64)
    split = morphir.default_registry().get("split")
    sites = [c.site for c in morphir.candidates(graph, split)]
    ctx = capture(graph, *batches[0], F.mse_loss, alias_calls=split.alias_calls(graph, sites))
    theta = split.init_theta(graph, sites, 0.3, torch.Generator().manual_seed(1)).double().requires_grad_()

    def estimate(t: torch.Tensor) -> torch.Tensor:
        return morphir.gn_estimate(split.local_change(ctx, sites, t), ctx.losses, per_sample=True).sum()

    (grad,) = torch.autograd.grad(estimate(theta), theta)
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (5, 1)]:
        step = torch.zeros_like(theta)
        step[i, j] = eps
        with torch.no_grad():
            numeric = (estimate(theta + step) - estimate(theta - step)) / (2 * eps)
        assert float(grad[i, j]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9)


def test_scoring_touches_no_weight_or_grad_and_writes_metadata_that_rewrites_drop() -> None:
    graph, batches = regression_net()
    for p in graph.module.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in graph.module.state_dict().items()}
    cands = morphir.score(graph, batches, F.mse_loss, morphisms=("split", "prune", "deepen"))
    after = graph.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in graph.module.parameters())
    assert all(c.theta is not None and c.estimate is not None for c in cands)
    records = graph.node("_0").meta["morphir.score"]
    assert {r["morphism"] for r in records} == {"split", "prune"} and len(records) == 12
    assert graph.is_valid("morphir.score")
    grown = morphir.apply(graph, cands[:1], "learned")
    assert "morphir.score" not in grown.node("_0").meta and not grown.is_valid("morphir.score")


def test_learned_split_theta_stays_in_its_trust_region_and_lowers_the_loss() -> None:
    graph, batches = regression_net(nn.Tanh)
    cfg = morphir.ScoreConfig(epochs=30, trust=0.3)
    cands = morphir.score(graph, batches, F.mse_loss, morphisms=("split",), config=cfg)
    for c in cands:
        w = graph.incoming_weights(c.site.anchor, c.site.index)
        assert float(c.theta.norm()) <= 0.3 * float(w.norm()) + 1e-6
    best = min(cands, key=lambda c: c.estimate)
    assert best.estimate < 0
    assert morphir.exact_delta_loss(graph, best, batches, F.mse_loss) < 0


class Opaque(morphir.Morphism):
    name = "opaque"

    def sites(self, graph):
        yield morphir.Site(graph.groups[1].name, 0)

    def theta_shape(self, graph, site):
        return torch.Size([1])

    def rewrite(self, rw, items):
        return False


def test_every_registered_morphism_scores_or_says_why_not() -> None:
    graph, batches = regression_net()
    for name in morphir.morphisms():
        if name == "add_channel":  # its θ comes from growers; it must say so
            with pytest.raises(morphir.MorphismError, match="'add_channel' cannot be scored: a new neuron's θ"):
                morphir.score(graph, batches, F.mse_loss, morphisms=(name,))
            continue
        cands = morphir.score(graph, batches, F.mse_loss, morphisms=(name,))
        assert cands and all(isinstance(c.estimate, float) for c in cands)
    reg = morphir.default_registry().register(Opaque())
    with pytest.raises(morphir.MorphismError, match="'opaque' cannot be scored: it is no morphir.ScoredMorphism"):
        morphir.score(graph, batches, F.mse_loss, morphisms=("opaque",), registry=reg)


def test_nan_loss_is_reported() -> None:
    graph, _ = regression_net()
    x = torch.full((4, 4), float("nan"))
    with pytest.raises(morphir.MorphirError, match="NaN"):
        morphir.score(graph, [(x, torch.zeros(4, 1))], F.mse_loss)


def bn_net(kind: str) -> tuple[morphir.MorphGraph, list]:
    """A producer, a batch norm with live running statistics, ReLU and a one-output readout."""
    torch.manual_seed(0)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
        x = torch.randn(32, 4)
    else:
        net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 1))
        x = torch.randn(32, 2, 4, 4)
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return morphir.trace(net, x[:1]), [(x, torch.randn(32, 1))]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batch_norm_folded_into_the_change_keeps_the_estimate_exact(kind: str) -> None:
    # batch norm in eval mode is affine per channel, so the Theorem 2 case still holds exactly
    graph, batches = bn_net(kind)
    graph.module.train()  # scoring runs the network in eval mode whatever mode it is in
    cands = morphir.score(graph, batches, F.mse_loss, morphisms=("split", "prune"),
                          config=morphir.ScoreConfig(lr=0.0))
    exact = morphir.exact_delta_losses(graph, cands, batches, F.mse_loss)
    assert len(cands) == 2 * (6 if kind == "linear" else 5)
    for cand, truth in zip(cands, exact):
        assert cand.estimate == pytest.approx(truth, abs=1e-4), cand
    assert max(abs(t) for t in exact) > 1e-3


def test_scoring_a_network_in_training_mode_leaves_its_buffers_and_modes_alone() -> None:
    graph, batches = bn_net("conv")
    graph.module.train()
    graph.submodule("3").eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in graph.module.named_modules()}
    buffers = {k: v.clone() for k, v in graph.module.named_buffers()}
    morphir.score(graph, batches * 3, F.mse_loss)
    assert {name: m.training for name, m in graph.module.named_modules()} == modes
    assert all(torch.equal(buffers[k], v) for k, v in graph.module.named_buffers())


def test_scoring_a_subset_gives_the_same_estimates_as_scoring_all() -> None:
    graph, batches = bn_net("conv")
    cfg = morphir.ScoreConfig(lr=0.0)
    full = {c: c for c in morphir.score(graph, batches, F.mse_loss, config=cfg)}
    chosen = [c for c in full if c.site.index in (1, 3)]
    scorer = morphir.Scorer(graph, F.mse_loss, ("split", "prune"), config=cfg, only=chosen)  # the built-ins by name
    with torch.no_grad():  # the same θ as in the full pass (a subset draws its random start differently)
        for _, group, theta, _ in scorer.plans:
            theta.copy_(torch.stack([full[c].theta for c in group]))
    for x, y in batches:
        scorer.step(x, y, learn=False)
    part = scorer.finish()
    assert len(part) == 4
    for c in part:
        assert c.estimate == pytest.approx(full[c].estimate, abs=1e-7)
        assert abs(c.estimate) > 1e-6


def wide_readout_net() -> tuple[morphir.MorphGraph, list]:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(48, 4, dtype=torch.float64)
    return morphir.trace(net, x[:1]), [(x, torch.randn(48, 3, dtype=torch.float64))]


def test_gauss_newton_curvature_is_exact_where_the_loss_is_quadratic_in_z_and_rank_one_is_not() -> None:
    # three outputs: L(z + Δz) = L + g·Δz + ½ Δzᵀ Jᵀ H J Δz exactly (linear readout, MSE), which
    # the rank-one (g·Δz)²/(4L) misses wherever J Δz is not along the residual
    graph, batches = wide_readout_net()
    kwargs = dict(morphisms=("split", "prune"))
    gn = morphir.score(graph, batches, F.mse_loss, config=morphir.ScoreConfig(lr=0.0, curvature="gauss-newton"), **kwargs)
    r1 = morphir.score(graph, batches, F.mse_loss, config=morphir.ScoreConfig(lr=0.0), **kwargs)
    exact = morphir.exact_delta_losses(graph, gn, batches, F.mse_loss)
    assert [c.key for c in gn] == [c.key for c in r1] and len(gn) == 12
    for cand, truth in zip(gn, exact):
        assert cand.estimate == pytest.approx(truth, rel=1e-6, abs=1e-9), cand
    worst = max(abs(c.estimate - t) for c, t in zip(r1, exact))
    assert worst > 1e-3 and worst > 20 * max(abs(c.estimate - t) for c, t in zip(gn, exact))


def test_curvature_factors_square_to_the_loss_hessian() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    u = morphir.curvature_factors(F.cross_entropy, logits, y)
    assert u.shape == (4, 5, 4)
    p = logits.softmax(-1)
    for n in range(5):  # cross-entropy: diag(p) − ppᵀ
        h = torch.einsum("ki,kj->ij", u[:, n], u[:, n])
        assert torch.allclose(h, torch.diag(p[n]) - torch.outer(p[n], p[n]), atol=1e-10)
    out, target = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    u = morphir.curvature_factors(F.mse_loss, out, target)
    h = torch.einsum("kni,knj->nij", u, u)
    assert torch.allclose(h, (2 / 3) * torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-10)
    big = torch.randn(2, morphir.capture.MAX_CURVATURE_OUTPUTS + 1)
    assert morphir.curvature_factors(F.mse_loss, big, torch.zeros_like(big)) is None  # too many: rank-one
    with pytest.raises(morphir.MorphirError, match="curvature must be one of"):
        morphir.ScoreConfig(curvature="diagonal")


def test_scoring_starts_from_the_theta_it_is_given_inside_the_trust_region() -> None:
    graph, batches = wide_readout_net()
    cands = morphir.candidates(graph, "split")
    w = graph.incoming_weights(cands[0].site.anchor, cands[0].site.index)
    given = {cands[0]: 0.01 * torch.ones_like(w), cands[1]: 100.0 * torch.ones_like(w)}  # the second beyond trust
    scored = {c.key: c for c in morphir.score(graph, batches, F.mse_loss, ("split",),
                                                config=morphir.ScoreConfig(lr=0.0), init=given)}
    assert torch.allclose(scored[cands[0].key].theta, given[cands[0]])
    second = scored[cands[1].key].theta
    radius = 0.3 * float(graph.incoming_weights(cands[1].site.anchor, cands[1].site.index).norm())
    assert float(second.norm()) == pytest.approx(radius, rel=1e-5)  # projected onto the trust region
    assert torch.allclose(second / second.norm(), given[cands[1]] / given[cands[1]].norm())


def test_the_core_scorer_needs_a_registry_for_names_and_the_package_one_defaults_to_the_built_ins() -> None:
    graph, batches = regression_net()
    with pytest.raises(morphir.MorphismError, match="given by name but no registry"):
        morphir.api.Scorer(graph, F.mse_loss, ("split",))
    core = morphir.api.Scorer(graph, F.mse_loss, ("split",), registry=morphir.default_registry())
    package = morphir.Scorer(graph, F.mse_loss, ("split",))
    assert [c.key for _, g, _, _ in core.plans for c in g] == [c.key for _, g, _, _ in package.plans for c in g]
    assert morphir.api.Scorer(graph, F.mse_loss, (morphir.passes.Split(),)).plans  # an instance needs none
