"""Growth to a size: the schedule decides how much each step adds, the scores decide where."""

import json

import pytest
import torch

import morphir
from growing import assert_same_run
from morphir.cli import main
from morphir.checkpoints import CHECKPOINT


def mlp(widths=(16, 16), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return morphir.zoo.build("mlp", (40,), 20, widths=widths)


def test_the_schedule_spreads_what_is_left_over_the_steps_to_the_target_phase() -> None:
    cfg = morphir.GrowConfig(phases=5, target_params=1000, target_phase=3)
    assert cfg.target == ("params", 1000.0)
    assert cfg.step_budget(1, 400) == pytest.approx(200.0)  # 600 left over steps 1, 2, 3
    assert cfg.step_budget(3, 800) == pytest.approx(200.0)
    assert cfg.step_budget(4, 900) == pytest.approx(100.0)  # behind after the target phase: catch up
    assert cfg.step_budget(2, 1200) == 0.0
    assert morphir.GrowConfig(phases=5, target_flops=1e6).step_budget(1, 0) == pytest.approx(0.5e6)  # default: phase 2
    with pytest.raises(morphir.MorphirError, match="not both"):
        morphir.GrowConfig(target_params=10, target_flops=10.0)
    with pytest.raises(morphir.MorphirError, match="target_phase must be at most"):
        morphir.GrowConfig(phases=3, target_params=10, target_phase=3)


def test_select_to_a_budget_ranks_by_gain_per_parameter_and_counts_where_new_weights_meet() -> None:
    g = morphir.trace(mlp(), torch.randn(2, 40))
    cands = morphir.candidates(g, "split")
    for i, c in enumerate(cands):  # the second layer's channels promise the most per parameter
        c.estimate = -(2.0 if c.site.anchor == "hidden.3" else 1.0) * c.delta_params * (1 + i / 100)
    chosen = morphir.select(cands, g, lam=0.0, budget=1_200)  # doubling both layers would add 1,824
    grown = morphir.apply(g, chosen)
    added = grown.num_params() - g.num_params()
    assert 1_200 - max(c.delta_params for c in cands) <= added <= 1_200 + max(c.delta_params for c in cands) / 2
    per = {a: sum(c.site.anchor == a for c in chosen) for a in ("hidden.0", "hidden.3")}
    assert per["hidden.3"] == 16  # every channel of the better group first (one split per channel)
    assert per["hidden.0"] > 0  # then the other, each counted with its corner on hidden.3's new rows
    assert sum(c.delta_params for c in chosen) < added  # the corners are real: more than the sum alone


def test_growth_reaches_the_target_size_by_the_target_phase(tmp_path) -> None:
    data = morphir.load_data("clusters", seed=0, batch_size=256)
    run = dict(phases=4, phase_epochs=1, target_params=8_340, target_phase=2, progress=False)
    kept: dict[str, bytes] = {}

    def keep(record):  # the run directory as a crash right after phase 2 leaves it
        if record["phase"] == 2:
            kept.update({n: (tmp_path / "a" / n).read_bytes() for n in (CHECKPOINT, "metrics.jsonl")})

    res = morphir.grow(mlp(), data.train, data.val, data.loss, run_dir=tmp_path / "a", on_phase=keep, **run)
    sizes = [m["params"] for m in res.metrics]
    assert sizes[0] == 1_332 and 1_332 < sizes[1] < 8_340  # half the way after phase 1
    assert abs(sizes[2] - 8_340) <= 200 and sizes[3] == sizes[2]  # there after phase 2, then held
    assert res.metrics[0]["budget"] > 0 and res.metrics[0]["rounds"] >= 2
    # after the target phase nothing more is added: the target is reached, or what is left of it is
    # at most one morphism's worth (a hidden unit of the first layer adds 59 parameters, of the
    # second 39) and no morphism that fits is estimated to help
    assert res.metrics[2].get("target_reached") or (res.metrics[2]["budget"] <= 59 and not res.metrics[2]["applied"])
    # the rounds of a step (several rewrites) replay: resuming that crash ends as the run did
    snap = tmp_path / "b"
    snap.mkdir()
    for name, data_ in kept.items():
        (snap / name).write_bytes(data_)
    resumed = morphir.grow(mlp(), data.train, data.val, data.loss, run_dir=snap, resume=True, **run)
    assert_same_run(res, resumed)


def test_cli_grows_to_a_target_and_refuses_a_target_phase_past_the_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grow", "zoo:mlp", "--data", "teacher", "--phases", "3", "--phase-epochs", "1", "--target-params",
                 "1066", "--target-phase", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed_params"] == 274 and summary["final_params"] == 1_066
    assert main(["grow", "zoo:mlp", "--data", "teacher", "--phases", "3", "--target-params", "1066",
                 "--target-phase", "3", "--out", str(tmp_path / "x")]) == 2
    assert "target_phase must be at most the last growth step (2)" in capsys.readouterr().err


def test_a_target_factor_is_a_target_relative_to_the_seed(tmp_path, capsys) -> None:
    cfg = morphir.GrowConfig(target_factor=4.0)
    assert cfg.resolved(274, 300.0).target == ("params", 1096.0)
    assert morphir.GrowConfig(target_factor=2.0, resource="flops").resolved(274, 300.0).target == ("flops", 600.0)
    assert morphir.GrowConfig(target_factor=4.0, target_params=500).resolved(274, 300.0).target == ("params", 500.0)
    assert morphir.GrowConfig(target_factor=None).resolved(274, 300.0).target is None  # the λ rule
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(morphir.MorphirError, match="target_factor"):
            morphir.GrowConfig(target_factor=bad)
    out = tmp_path / "run"
    assert main(["grow", "zoo:mlp", "--data", "teacher", "--phases", "2", "--phase-epochs", "1", "--target-factor",
                 "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed_params"] == 274 and abs(summary["final_params"] - 3 * 274) <= 30
    with pytest.raises(SystemExit) as exc:
        main(["grow", "zoo:mlp", "--data", "teacher", "--target-factor", "0.5", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "argument --target-factor: 0.5 must be > 1" in capsys.readouterr().err
    assert main(["grow", "zoo:mlp", "--data", "teacher", "--phases", "2", "--phase-epochs", "1", "--target-factor",
                 "none", "--out", str(tmp_path / "lam")]) == 0
    lam = json.loads((tmp_path / "lam" / "summary.json").read_text())
    assert lam["final_params"] < 3 * 274 - 100  # no target: the λ rule grows by what the estimates allow
