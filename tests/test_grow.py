"""The growth loop: selection, phases, optimizer carry-over, checkpoints, resume, faults, CLI outputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from growing import loaders, small_net
from morphir.cli import main
from morphir.data import digits_tensors
from morphir.checkpoints import CHECKPOINT
from morphir.selection import select
from morphir.train import recalibrate_batch_norm
from morphir.passes import GaussNewton

FAST = dict(phases=3, phase_epochs=1, score_batches=2, lam=0.0)


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    xt, yt, xv, yv = digits_tensors(seed=0)
    path = tmp_path / "digits_small.npz"
    np.savez(path, x=xt[:192].numpy(), y=yt[:192].numpy(), x_val=xv[:64].numpy(), y_val=yv[:64].numpy())
    return path


# -- selection -----------------------------------------------------------------------------------------
def scored(graph, name, index, estimate, dparams):
    c = next(c for c in morphir.candidates(graph, name) if c.site.index == index and c.site.anchor == "0")
    c.estimate, c.delta_params = estimate, dparams
    return c


def test_select_applies_the_criterion_top_fraction_one_morphism_per_channel_and_never_empties_a_group() -> None:
    g = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    cands = [
        scored(g, "split", 0, -0.50, 100),  # margin 0.5 - 0.1 = 0.4
        scored(g, "prune", 0, -0.60, -100),  # margin 0.7: beats the split of the same channel
        scored(g, "split", 1, -0.05, 100),  # margin -0.05: rejected
        scored(g, "prune", 2, 0.05, -100),  # margin 0.05
        scored(g, "split", 3, -0.30, 100),  # margin 0.2
    ]
    chosen = select(cands, g, lam=1e-3, top_fraction=1.0)
    assert [(c.name, c.site.index) for c in chosen] == [("prune", 0), ("split", 3), ("prune", 2)]
    # top 30 % of 3 positive morphisms, rounded up: 1
    assert [(c.name, c.site.index) for c in select(cands, g, lam=1e-3, top_fraction=0.3)] == [("prune", 0)]
    # λ = 0: the split at channel 1 qualifies too; the prune at channel 2 (ΔL > 0) still does not
    assert [(c.name, c.site.index) for c in select(cands, g, lam=0.0, top_fraction=1.0)] == [
        ("prune", 0), ("split", 3), ("split", 1)]
    prunes = [scored(g, "prune", i, -1.0 - i, -10) for i in range(6)]
    kept = select(prunes, g, lam=0.0, top_fraction=1.0)
    assert len(kept) == 5  # a group of 6 channels keeps at least one


def test_select_never_empties_a_group_for_any_morphism_that_declares_it_removes_channels() -> None:
    class Cull(morphir.passes.Prune):  # another name: the rule follows the declaration, not the name
        name = "cull"

    class Copy(morphir.passes.Prune):
        name = "copy"
        removes_channel = False

    g = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    for morph, expected in ((Cull(), 5), (Copy(), 6)):
        cands = [c for c in morph.candidates(g) if c.site.anchor == "0"][:6]
        for i, c in enumerate(cands):
            c.estimate = -1.0 - i
        assert g.group(cands[0].site.anchor).width == 6
        assert len(select(cands, g, lam=0.0, top_fraction=1.0)) == expected


# -- the loop ------------------------------------------------------------------------------------------
def test_the_learning_rate_restarts_after_a_growth_step_that_changed_the_network() -> None:
    train, val = loaders()
    opts = dict(phases=3, phase_epochs=2, score_batches=2, lr=0.04)
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **opts)
    # the target is reached at the first step, so the second changes nothing and the cosine started
    # after the first (over the 4 epochs left) goes on
    assert [bool(m["applied"]) for m in res.metrics] == [True, False, False]
    assert [m["lr"] for m in res.metrics] == pytest.approx([0.04, 0.04, 0.02])
    once = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, schedule="cosine", **opts)
    assert [m["lr"] for m in once.metrics] == pytest.approx([0.04 * 0.5 * (1 + math.cos(math.pi * e / 6))
                                                             for e in (0, 2, 4)])
    assert res.metrics[0]["val_loss"] == once.metrics[0]["val_loss"]  # the same run until the first growth
    # under a FLOPs budget the cosine restarts in the share of the budget left
    budget = 3 * res.metrics[-1]["train_flops"]
    spent = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, budget_flops=budget, **opts)
    assert spent.metrics[1]["lr"] == pytest.approx(0.04)
    with pytest.raises(morphir.MorphirError, match="schedule must be"):
        morphir.GrowConfig(schedule="step")


def test_grow_runs_phases_grows_and_records_metrics() -> None:
    train, val = loaders()
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **FAST)
    assert [m["phase"] for m in res.metrics] == [1, 2, 3]
    assert [m["epochs"] for m in res.metrics] == [1, 2, 3]
    for m in res.metrics:
        assert set(m) >= {"train_loss", "val_loss", "val_accuracy", "params", "flops", "widths", "applied", "seconds"}
        assert 0.0 <= m["val_accuracy"] <= 1.0 and m["params"] > 0 and m["flops"] > 0
    assert res.metrics[-1]["applied"] == {}  # no growth after the last phase
    assert sum(sum(m["applied"].values()) for m in res.metrics) > 0  # λ = 0: every helpful morphism qualifies
    assert res.metrics[1]["widths"] != res.metrics[0]["widths"]
    assert res.metrics[-1]["params"] == res.graph.num_params() == res.summary()["final_params"]
    assert res.summary()["seed_params"] == sum(p.numel() for p in small_net().parameters())
    # the learning rate follows a cosine over the epochs left since the last step that grew, across rewrites
    e0 = max([m["epochs"] for m in res.metrics[:2] if m["applied"]], default=0)
    assert res.metrics[0]["lr"] == pytest.approx(0.05)
    assert res.metrics[2]["lr"] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * (2 - e0) / (3 - e0))))
    # the grown network is a working model with the width changes the metrics report
    widths = res.metrics[-1]["widths"]
    assert res.graph.group("0").width == widths["0"]
    assert res.graph.module(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # near-duplicate channels per group, measured on the widths of the same record
    for m in res.metrics:
        assert set(m["redundant"]) == set(m["widths"])
        assert all(0 <= m["redundant"][g] <= m["widths"][g] for g in m["widths"])
    assert res.summary()["redundant_channels"] == sum(res.metrics[-1]["redundant"].values())


def test_growth_is_deterministic_for_a_seed() -> None:
    train, val = loaders()
    a = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **FAST)
    b = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **FAST)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    sa, sb = a.graph.module.state_dict(), b.graph.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    train, val = loaders()
    full = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, run_dir=tmp_path / "a", **FAST)

    def crash(record):
        if record["phase"] == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, run_dir=tmp_path / "b",
                     on_phase=crash, **FAST)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["phase"] == 2
    resumed = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, run_dir=tmp_path / "b",
                           resume=True, **FAST)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    assert strip(resumed.metrics) == strip(full.metrics)
    sa, sb = full.graph.module.state_dict(), resumed.graph.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == [1, 2, 3]
    # other settings are refused, naming the difference
    with pytest.raises(morphir.CheckpointError, match="lam: 0.0 -> 0.5"):
        morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, run_dir=tmp_path / "b",
                     resume=True, **{**FAST, "lam": 0.5})


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    train, val = loaders()
    broken = {"on": False}

    def loss(out, y, **kw):
        value = F.cross_entropy(out, y, **kw)
        return value * float("nan") if broken["on"] else value

    def after(record):
        broken["on"] = record["phase"] == 1  # phase 1 is checkpointed; phase 2 diverges at once

    with pytest.raises(morphir.TrainingError, match=r"nan at phase 2, epoch 2, step 1.*checkpoint after phase 1"):
        morphir.grow(small_net(), train, val, loss, progress=False, run_dir=tmp_path, on_phase=after, **FAST)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["phase"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    # the run continues from there once the cause is fixed
    broken["on"] = False
    res = morphir.grow(small_net(), train, val, loss, progress=False, run_dir=tmp_path, resume=True, **FAST)
    assert [m["phase"] for m in res.metrics] == [1, 2, 3]


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    train, val = loaders()
    real_fdopen = os.fdopen
    opened = {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half of it lands, then the disk is full
            raise OSError(28, "No space left on device")

    def fdopen(fd, mode="r", *a, **kw):
        f = real_fdopen(fd, mode, *a, **kw)
        if "b" in mode:  # checkpoint writes: the third is the one after phase 2
            opened["n"] += 1
            if opened["n"] == 3:
                return FullDisk(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(morphir.CheckpointError, match="after phase 2.*No space left.*previous checkpoint is kept"):
        morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, run_dir=tmp_path, **FAST)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["phase"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_retrain_trains_the_found_architecture_from_scratch() -> None:
    train, val = loaders()
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **FAST)
    before = {k: v.clone() for k, v in res.graph.module.state_dict().items()}
    out = morphir.retrain(res, train, val, F.cross_entropy, progress=False)
    assert out["epochs"] == 3 and out["params"] == res.graph.num_params()
    assert 0.0 <= out["val_accuracy"] <= 1.0 and res.summary()["retrain"] == out
    after = res.graph.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the grown net itself is untouched


def test_random_theta_ablation_keeps_theta_at_its_random_start() -> None:
    train, val = loaders()
    unchecked = GaussNewton(verify=False)  # with the check, the line search may scale θ down
    res = morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, theta="random", method=unchecked,
                       **FAST)
    splits = [e for step in res.log for e in step if e["morphism"] == "split"]
    assert splits and all(e["theta"] is not None and float(e["theta"].norm()) > 0 for e in splits)


# -- the command line -------------------------------------------------------------------------------
def grow_cli(tmp_path: Path, npz: Path, out: str, *extra: str) -> int:
    return main(["grow", "zoo:vgg19", "--data", str(npz), "--phases", "2", "--phase-epochs", "1",
                 "--batch-size", "32", "--lam", "0", "--out", str(tmp_path / out), *extra])


def test_cli_grow_writes_every_output_and_export_and_report_work(tmp_path: Path, npz: Path, capsys) -> None:
    assert grow_cli(tmp_path, npz, "run", "--retrain") == 0
    run = tmp_path / "run"
    printed = capsys.readouterr().out
    assert "phase 1:" in printed and "retrained from scratch" in printed
    for name in ("grown.pt", "grown.pt2", "grown.onnx", "metrics.jsonl", "summary.json", "report.png",
                 "report.html", CHECKPOINT):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert {"seed_params", "final_params", "final_flops", "val_accuracy", "phases", "seconds", "retrain"} <= set(summary)
    assert summary["phases"] == 2
    grown = torch.load(run / "grown.pt", weights_only=False)
    assert sum(p.numel() for p in grown.parameters()) == summary["final_params"]
    program = torch.export.load(run / "grown.pt2")
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(program.module()(x), grown.eval()(x), atol=1e-5)

    onnx_path = tmp_path / "again.onnx"
    assert main(["export", str(run / "grown.pt"), "--onnx", str(onnx_path), "--check", "--input-shape", "1,1,8,8",
                 "--allow-pickle"]) == 0
    assert onnx_path.stat().st_size > 0
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").stat().st_size > 0
    # a second run into the same directory is refused rather than overwriting it
    assert grow_cli(tmp_path, npz, "run") == 1
    assert "--resume" in capsys.readouterr().err


def test_cli_bad_data_fails_before_training(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    assert main(["grow", "zoo:vgg19", "--data", str(bad), "--out", str(tmp_path / "r1")]) == 1
    assert "cannot read the data file" in capsys.readouterr().err
    model = tmp_path / "net.pt"
    torch.save(small_net(), model)  # takes 1×8×8 images: its linear layer reads 6·4·4 features
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((20, 1, 6, 6), np.float32), y=np.zeros(20, np.int64))
    assert main(["grow", str(model), "--data", str(wrong), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert "wrong.npz: samples of shape (1, 6, 6) do not fit" in err and "mat1 and mat2" in err
    assert "Traceback" not in err and not (tmp_path / "r2").exists()
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20, dtype=np.int64))
    assert main(["grow", "zoo:vgg19", "--data", str(labels), "--num-classes", "10", "--out", str(tmp_path / "r3")]) == 1
    assert "but the model outputs shape (2, 10)" in capsys.readouterr().err  # labels reach 10 or more
    assert not (tmp_path / "r3" / CHECKPOINT).exists()
    missing = main(["grow", "zoo:vgg19", "--data", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r4")])
    assert missing == 1 and "no such data file" in capsys.readouterr().err


def test_cli_resumes_a_run_killed_with_sigkill(tmp_path: Path, npz: Path) -> None:
    args = ["zoo:vgg19:4", "--data", str(npz), "--phases", "3", "--phase-epochs", "1", "--batch-size", "32",
            "--lam", "0", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "morphir.cli", "grow", *args]
    assert subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n")
    assert 1 <= done < 3, "the kill must land mid-run"
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run([*cmd, "--out", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    def load(run):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert load(killed) == load(tmp_path / "full")
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model_state"]
    b = torch.load(killed / CHECKPOINT, weights_only=True)["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Ctrl-C: a resumable checkpoint and a message saying how to resume
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([*cmd, "--out", str(stopped)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = stopped / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Resume with:" in err and "--resume" in err
    resumed = subprocess.run([*cmd, "--out", str(stopped), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert load(stopped) == load(tmp_path / "full")


def test_recalibrate_batch_norm_sets_running_statistics_to_the_batch_average() -> None:
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(bn)
    xs = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
    assert recalibrate_batch_norm(net, [(x, None) for x in xs]) == 4
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and net.training  # settings and mode restored


def test_data_sources_pt_file_and_module_function(tmp_path: Path, monkeypatch) -> None:
    xt, yt, _, _ = digits_tensors(seed=0)
    pt = tmp_path / "d.pt"
    torch.save({"x": xt[:100], "y": yt[:100]}, pt)
    data = morphir.load_data(str(pt), seed=1, batch_size=16, val_fraction=0.2)
    n_train = sum(len(y) for _, y in data.train)
    n_val = sum(len(y) for _, y in data.val)
    assert (n_train, n_val) == (80, 20)
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def loaders():\n"
        "    x = torch.zeros(8, 1, 8, 8); y = torch.arange(8) % 10\n"
        "    return [(x, y)], [(x[:4], y[:4])]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = morphir.load_data("mydata:loaders")
    assert [tuple(x.shape) for x, _ in data.val] == [(4, 1, 8, 8)]
    with pytest.raises(morphir.DataError, match="module 'mydata' has no function 'nothing_here'"):
        morphir.load_data("mydata:nothing_here")
    torch.save({"x": xt[:10], "y": yt[:9]}, tmp_path / "short.pt")
    with pytest.raises(morphir.DataError, match="one label per sample"):
        morphir.load_data(str(tmp_path / "short.pt"))
    with pytest.raises(morphir.DataError, match="not a data source"):
        morphir.load_data("imagenet")


def test_progress_bars_show_phases_and_epochs_when_asked(capsys) -> None:
    train, val = loaders(n=64)
    morphir.grow(small_net(), train, val, F.cross_entropy, progress=True, **{**FAST, "phases": 2})
    err = capsys.readouterr().err
    assert "phases" in err and "phase 1 epochs" in err
    morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **{**FAST, "phases": 2})
    assert capsys.readouterr().err == ""


def test_cli_checks_validation_labels_and_refuses_a_resume_with_another_batch_size(tmp_path: Path, npz: Path,
                                                                                   capsys) -> None:
    xt, yt, _, _ = digits_tensors(seed=0)
    bad_val = tmp_path / "bad_val.pt"
    torch.save({"x": xt[:40], "y": yt[:40] % 3, "x_val": xt[:6], "y_val": torch.tensor([0, 1, 2, 5, 6, 7])}, bad_val)
    model = tmp_path / "net3.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), model)
    assert main(["grow", str(model), "--data", str(bad_val), "--out", str(tmp_path / "v")]) == 1
    assert "labels go up to 7" in capsys.readouterr().err
    negative = tmp_path / "neg.pt"
    torch.save({"x": xt[:40], "y": yt[:40] % 3 - 1}, negative)
    assert main(["grow", str(model), "--data", str(negative), "--out", str(tmp_path / "n")]) == 1
    assert "a class label is -1" in capsys.readouterr().err

    assert grow_cli(tmp_path, npz, "bs") == 0
    assert grow_cli(tmp_path, npz, "bs", "--resume", "--batch-size", "16") == 1
    err = capsys.readouterr().err
    assert "batch size 32" in err and "batch size 16" in err


def test_cli_confidence_withholds_growth_whose_estimate_is_within_its_noise(tmp_path: Path, npz: Path,
                                                                            capsys) -> None:
    assert grow_cli(tmp_path, npz, "paper") == 0
    assert grow_cli(tmp_path, npz, "sure", "--confidence", "1e9") == 0
    paper, sure = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("paper", "sure"))
    assert paper["final_params"] > paper["seed_params"]  # the paper's rule grows
    assert sure["final_params"] == sure["seed_params"]  # no estimate is 1e9 standard errors above zero
    first = json.loads((tmp_path / "sure" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["applied"] == {} and first["estimated_gain"] is not None  # scored, nothing applied
    with pytest.raises(SystemExit) as exit_:  # a bad option: argparse's exit 2, before any work
        grow_cli(tmp_path, npz, "bad", "--confidence", "-1")
    assert exit_.value.code == 2 and "argument --confidence: -1 must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_select_with_confidence_discounts_the_standard_error() -> None:
    g = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    sure, noisy = scored(g, "split", 0, -0.50, 100), scored(g, "split", 1, -0.50, 100)
    sure.extra["stderr"], noisy.extra["stderr"] = 0.05, 0.30
    assert {c.site.index for c in select([sure, noisy], g, lam=0.0, top_fraction=1.0)} == {0, 1}
    assert [c.site.index for c in select([sure, noisy], g, lam=0.0, top_fraction=1.0, confidence=2.0)] == [0]


def test_scores_carry_a_standard_error_and_can_be_estimated_on_held_out_batches() -> None:
    train, _ = loaders()
    batches = list(train)
    g = morphir.trace(small_net(), torch.zeros(1, 1, 8, 8))
    frozen = morphir.ScoreConfig(lr=0.0, seed=3)  # θ stays at its (seeded) start
    held = morphir.score(g, batches[:2], F.cross_entropy, ("split",), config=frozen, estimate_batches=batches[2:4])
    direct = morphir.score(g, batches[2:4], F.cross_entropy, ("split",), config=frozen)
    assert [c.estimate for c in held] == pytest.approx([c.estimate for c in direct], rel=1e-9, abs=1e-12)
    errs = [c.extra["stderr"] for c in held]
    assert all(e >= 0 for e in errs) and sum(e > 0 for e in errs) > len(errs) // 2  # 0 only where θ changes nothing
    assert all(e <= abs(c.estimate) * 50 + 1e-9 for e, c in zip(errs, held))
