"""The grower harness: the built-in growers' invariants, plateau-triggered growth, the FLOPs budget."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import morphir
from growing import assert_same_run, loaders, small_net
from morphir.passes import Net2Net, RandomGrowth, builtin_growers


def make_step(graph: morphir.MorphGraph, **config) -> morphir.GrowthStep:
    train, _ = loaders()
    batches = [(x, y) for x, y in list(train)[:2]]
    cfg = morphir.GrowConfig(**config)
    return morphir.GrowthStep(graph, batches, None, train, F.cross_entropy, cfg,
                              morphir.default_registry(), phase=1, seed=123)


def trained_graph() -> morphir.MorphGraph:
    train, _ = loaders()
    net = small_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    morphir.train.train_epoch(net, opt, train, F.cross_entropy, where="test", device=torch.device("cpu"))
    return morphir.trace(net.eval(), torch.zeros(1, 1, 8, 8))


def test_builtin_growers_are_listed_with_gn_first() -> None:
    growers = builtin_growers()
    assert list(growers)[:3] == ["gn", "net2net", "random"]
    assert all(g.name == name and g.description for name, g in growers.items())
    with pytest.raises(morphir.MorphirError, match="unknown growth method 'nope'"):
        morphir.resolve_grower("nope")


def test_net2net_widened_and_deepened_net_equals_the_original_before_noise() -> None:
    g = trained_graph()
    x = torch.randn(16, 1, 8, 8)
    growth = Net2Net(noise=0.0, deepen=1).grow(make_step(g))
    grown = growth.result.graph
    widths = [grp.width for grp in g.groups if grp.growable]
    quota = [math.ceil(0.3 * w) for w in widths]
    assert [grp.width for grp in grown.groups if grp.growable][:2] == [w + q for w, q in zip(widths, quota)]
    assert sum(c.name == "deepen" for c in growth.chosen) == 1
    assert len(list(grown.module.modules())) == len(list(g.module.modules())) + 2  # conv + relu inserted
    with torch.no_grad():
        assert torch.allclose(grown.module(x), g.module(x), atol=1e-5)
    # with noise the function moves, by about the noise
    noisy = Net2Net(noise=1e-2, deepen=1).grow(make_step(g)).result.graph
    with torch.no_grad():
        moved = (noisy.module(x) - g.module(x)).abs().max()
        scale = g.module(x).abs().max()
    assert 0 < moved < 0.05 * scale


def test_random_growth_adds_random_incoming_and_zero_outgoing_weights_exactly() -> None:
    g = trained_graph()
    x = torch.randn(16, 1, 8, 8)
    step = make_step(g)
    growth = RandomGrowth().grow(step)
    grown = morphir.rewrite(g, growth.chosen, dict(growth.thetas)).graph  # checked at θ = 0 by the engine
    with torch.no_grad():
        assert torch.equal(grown.module(x), g.module(x))
    grp = g.groups[[gg.name for gg in g.groups].index("0")]
    new = range(grp.width, grp.width + step.quota("0"))
    assert grown.group("0").width == grp.width + len(new)
    for c in new:
        v, u = grown.incoming_weights("0", c), grown.outgoing_weights("0", c)
        assert float(u.abs().max()) == 0.0
        rms = float(g.submodule("0").weight.detach().pow(2).mean().sqrt())
        assert 0.3 * rms < float(v.pow(2).mean().sqrt()) < 3 * rms


@pytest.mark.parametrize("method", ["net2net", "random"])
def test_grower_runs_end_to_end_and_resumes(method: str, tmp_path: Path) -> None:
    train, val = loaders()
    opts = dict(method=method, phases=3, phase_epochs=1, progress=False)
    full = morphir.grow(small_net(), train, val, F.cross_entropy, run_dir=tmp_path / "a", **opts)
    assert full.graph.num_params() > full.seed_params
    assert all(math.isfinite(m["loss_jump"]) for m in full.metrics[:-1])
    if method == "random":
        assert all(abs(m["loss_jump"]) < 1e-5 for m in full.metrics[:-1])  # exact at growth

    def crash(record):
        if record["phase"] == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        morphir.grow(small_net(), train, val, F.cross_entropy, run_dir=tmp_path / "b", on_phase=crash, **opts)
    resumed = morphir.grow(small_net(), train, val, F.cross_entropy, run_dir=tmp_path / "b", resume=True, **opts)
    assert_same_run(full, resumed)


def test_plateau_growth_grows_when_the_training_loss_stops_improving() -> None:
    train, val = loaders()
    # the λ rule (no target), so every plateau's step grows by what the estimates allow
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, when="plateau", patience=2,
                       plateau_delta=0.9, phases=3, phase_epochs=6, score_batches=2, target_factor=None)
    assert sum(len(m["epoch_losses"]) for m in res.metrics) == 18  # phases × phase_epochs in all
    for m in res.metrics[:-1]:  # every phase but the last ended on a plateau, and not before
        losses, best, since, ended = m["epoch_losses"], math.inf, 0, []
        for loss in losses:
            if loss < best * (1 - 0.9):
                best, since = loss, 0
            else:
                since += 1
            ended.append(since >= 2)
        assert ended[-1] and not any(ended[:-1])
        assert m["applied"]  # and a growth step followed
    assert len(res.metrics) >= 2


def test_a_flops_budget_stops_the_run_and_drives_the_schedule() -> None:
    train, val = loaders()
    seed = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    epoch = 3 * morphir.count_flops(seed) * 320
    budget = 7.5 * epoch
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, method="net2net", phases=3,
                       phase_epochs=2, budget_flops=budget)
    spent = res.metrics[-1]["train_flops"]
    last = 3 * res.metrics[-1]["flops"] * 320
    assert budget <= spent < budget + last  # stopped in the epoch that crossed the budget
    # growth steps count against the budget: training alone is 3 × forward FLOPs × samples per epoch
    growth = [m["growth_flops"] for m in res.metrics[:-1]]
    assert all(f is not None and f > 0 for f in growth)
    epochs = [m["epoch_losses"] for m in res.metrics]
    training = sum(3 * m["flops"] * 320 * len(e) for m, e in zip(res.metrics, epochs))
    assert spent == pytest.approx(training + sum(growth))
    assert res.metrics[-1]["epochs"] < 3 * 2 + 10 and len(res.metrics) == 3
    # the learning rate follows the cosine in the share of the budget spent since the last growth
    first, second, third = res.metrics
    assert first["applied"] and second["applied"]
    assert second["lr"] == pytest.approx(0.05)  # restarted after the first step
    assert third["lr"] == pytest.approx(0.05)  # and after the second
    once = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, method="net2net", phases=3,
                        phase_epochs=2, budget_flops=budget, schedule="cosine").metrics  # one cosine in the budget
    assert once[1]["lr"] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * once[0]["train_flops"] / budget)))
    with pytest.raises(morphir.MorphirError, match="budget_flops must be a finite number > 0"):
        morphir.GrowConfig(budget_flops=0)


def test_a_resume_with_other_grower_settings_is_refused(tmp_path: Path) -> None:
    train, val = loaders()
    opts = dict(phases=2, phase_epochs=1, progress=False, run_dir=tmp_path)
    morphir.grow(small_net(), train, val, F.cross_entropy, method=Net2Net(noise=0.01), **opts)
    with pytest.raises(morphir.CheckpointError, match="grower:.*'noise': 0.01.*'noise': 0.5"):
        morphir.grow(small_net(), train, val, F.cross_entropy, method=Net2Net(noise=0.5), resume=True, **opts)


@pytest.mark.parametrize("method", list(builtin_growers()))
def test_every_grower_grows_a_zoo_net_on_a_tiny_budget(method: str) -> None:
    train, val = loaders(n=192)
    torch.manual_seed(0)
    net = morphir.zoo.build("vgg19", (1, 8, 8), 10)
    res = morphir.grow(net, train, val, F.cross_entropy, method=method, phases=2, phase_epochs=1, score_batches=2,
                       progress=False)
    first = res.metrics[0]
    assert first["applied"] and res.graph.num_params() > res.seed_params
    assert math.isfinite(first["loss_jump"]) and first["growth_seconds"] > 0
    if method in ("random", "gradmax"):
        assert abs(first["loss_jump"]) < 1e-5  # exact at growth
    assert res.graph.module(torch.randn(2, 1, 8, 8)).shape == (2, 10)


class _Costly(morphir.Grower):
    """Splits channel 0 of every group after burning 2·n³ FLOPs in a matmul."""

    name = "costly"

    def __init__(self, n: int):
        self.n = n

    def grow(self, step: morphir.GrowthStep) -> morphir.Growth:
        a = torch.ones(self.n, self.n)
        _ = a @ a
        return morphir.Growth(chosen=[c for c in step.candidates("split") if c.site.index == 0])


def test_a_growth_step_that_spends_the_rest_of_the_budget_is_charged_but_not_applied() -> None:
    train, val = loaders()
    seed = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    epoch = 3 * morphir.count_flops(seed) * 320
    budget = 3.5 * epoch  # two epochs, then a growth step of 2·400³ ≈ 1.3e8 FLOPs > what is left
    cheap = morphir.grow(small_net(), train, val, F.cross_entropy, method=_Costly(8), phases=3, phase_epochs=2,
                         budget_flops=budget, progress=False)
    assert cheap.metrics[0]["applied"] == {"split": 2} and len(cheap.metrics) >= 2
    costly = morphir.grow(small_net(), train, val, F.cross_entropy, method=_Costly(400), phases=3, phase_epochs=2,
                          budget_flops=budget, progress=False)
    (only,) = costly.metrics
    assert only["budget_spent_by_growth"] and only["applied"] == {} and costly.log == [[]]
    assert only["growth_flops"] >= 2 * 400**3 and only["train_flops"] == pytest.approx(2 * epoch + only["growth_flops"])
    assert costly.graph.num_params() == costly.seed_params
