"""Hostile input: every bad option, file, data set, directory and value gets a clear error that says
what, where and what to do, a non-zero exit from the CLI, and loses nothing already written."""

from __future__ import annotations

import json
import contextlib
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from growing import loaders, small_net
from morphir.cli import main
from morphir.checkpoints import CHECKPOINT, _digest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``morphir argv`` in this process: (exit status, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


# -- options ------------------------------------------------------------------------------------------
GROW = ["grow", "zoo:vgg19", "--out", "never-written"]
BAD_OPTIONS = [
    (GROW, "--lr", ["nan", "inf", "-inf", "0", "-1", "1e308", "x"]),
    (GROW, "--lam", ["nan", "inf", "-1"]),
    (GROW, "--confidence", ["nan", "inf", "-0.5"]),
    (GROW, "--top-fraction", ["0", "1.5", "nan", "-0.1"]),
    (GROW, "--budget-flops", ["0", "-1e9", "inf", "nan"]),
    (GROW, "--batch-size", ["0", "-1", "2.5"]),
    (GROW, "--phases", ["0", "-2", "1.5"]),
    (GROW, "--phase-epochs", ["0"]),
    (GROW, "--patience", ["0"]),
    (GROW, "--num-classes", ["0", "1", "-3"]),
    (GROW, "--seed", ["-1", "99999999999999999999999"]),
    (GROW, "--onnx-rtol", ["nan", "-1"]),
    (GROW, "--onnx-atol", ["inf"]),
    (GROW, "--device", ["gpu", "CUDA", "", "cpu,cuda", "meta", "cuda", "cuda:7", "mps"]),
    (["score", "zoo:vgg19"], "--epochs", ["-1"]),
    (["score", "zoo:vgg19"], "--batches", ["0"]),
    (["score", "zoo:vgg19"], "--top", ["-5"]),
    (["score", "zoo:vgg19"], "--batch-size", ["0"]),
    (["inspect", "zoo:vgg19"], "--num-classes", ["0"]),
    (["inspect", "zoo:vgg19"], "--input-shape", ["1,,3,8,8", "0,3,8,8", "1", "1,a"]),
    (["export", "zoo:vgg19", "--onnx", "x.onnx"], "--onnx-rtol", ["nan"]),
]


@pytest.mark.parametrize("prefix,option,values", BAD_OPTIONS, ids=[f"{p[0]}{o}" for p, o, _ in BAD_OPTIONS])
def test_every_bad_option_exits_2_naming_it(prefix, option, values, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for value in values:
        rc, err = run_cli([*prefix, f"{option}={value}"], capsys)
        assert rc == 2, (option, value, err)
        assert f"argument {option}" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "never-written").exists()  # refused before any work


def test_score_needs_a_morphism(capsys) -> None:
    rc, err = run_cli(["score", "zoo:vgg19", "--epochs", "0", "--batches", "1", "--morphisms", ","], capsys)
    assert rc == 1 and "--morphisms names no morphism" in err


def test_a_huge_input_shape_is_an_error_not_a_crash(tmp_path, capsys) -> None:
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), tmp_path / "net.pt")
    rc, err = run_cli(["inspect", str(tmp_path / "net.pt"), "--input-shape", "100000,3,100000,100000"], capsys)
    assert rc == 1 and "too large to allocate" in err


# -- the run directory ----------------------------------------------------------------------------------
def test_an_unusable_out_directory_is_refused_before_any_work(tmp_path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for out, why in [(a_file, "is a file, not a directory"), (a_file / "run", "cannot be created"),
                     ("/proc/self/morphir-run", "is not writable (nothing can be created in /proc/self)")]:
        rc, err = run_cli(["grow", "zoo:vgg19", "--out", str(out)], capsys)
        assert rc == 1 and f"--out {out}" in err and why in err, err
        assert "free space" not in err
    assert a_file.read_text() == "keep me"
    # a read-only directory (procfs refuses new files even to root): resuming there is refused up front
    rc, err = run_cli(["grow", "zoo:vgg19", "--out", "/proc/self", "--resume"], capsys)
    assert rc == 1 and "is not writable" in err and "resuming writes checkpoints there" in err
    rc, err = run_cli(["grow", "zoo:vgg19", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert rc == 1 and "there is no run to resume" in err


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real two-phase run's directory (its checkpoint after phase 2)."""
    run = tmp_path_factory.mktemp("run")
    train, val = loaders(n=128)
    morphir.grow(small_net(), train, val, F.cross_entropy, phases=2, phase_epochs=1, run_dir=run, progress=False)
    return run


def resume(run: Path, phases: int = 2, **options) -> morphir.GrowResult:
    train, val = loaders(n=128)
    return morphir.grow(small_net(), train, val, F.cross_entropy, phases=phases, phase_epochs=1, run_dir=run,
                        resume=True, progress=False, **options)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_changed_in_place_is_refused(finished_run, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path / "flipped")
    path = run / CHECKPOINT
    data = bytearray(path.read_bytes())
    ckpt = torch.load(path, weights_only=True)
    weight = ckpt["model_state"]["0.weight"].numpy().tobytes()
    at = bytes(data).find(weight[:32])
    assert at > 0
    data[at:at + 16] = bytes(b ^ 0x55 for b in data[at:at + 16])  # same size, other weights
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(morphir.CheckpointError, match="does not match its checksum"):
        resume(run)
    assert path.read_bytes() == before  # nothing written over it
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(morphir.CheckpointError, match="cannot read the checkpoint"):
        resume(run)


def resave(run: Path, change) -> None:
    """Rewrite the checkpoint with ``change`` applied and a valid checksum: only the schema can catch it."""
    path = run / CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("checksum")
    change(ckpt)
    torch.save({**ckpt, "checksum": _digest(ckpt)}, path)


def _three_phases(ckpt: dict) -> None:
    """A checkpoint consistent in itself, after phase 3 of a 2-phase run."""
    metrics = json.loads(ckpt["metrics"])
    ckpt.update(phase=3, metrics=json.dumps(metrics + metrics[-1:]))


SCHEMA = [
    ("missing model_state", lambda c: c.pop("model_state"), "'model_state' is missing"),
    ("phase a string", lambda c: c.update(phase="x"), "'phase' must be an integer"),
    ("phase negative", lambda c: c.update(phase=-2), "'phase' must be an integer >= 0"),
    ("phase beyond the run", lambda c: _three_phases(c), "field 'phase' is 3, beyond the run's 2 phases"),
    ("epoch negative", lambda c: c.update(epoch=-1), "'epoch' must be an integer >= 0"),
    ("done a string", lambda c: c.update(done="no"), "'done' must be true or false"),
    ("metrics not JSON", lambda c: c.update(metrics="not json"), "'metrics' is not valid JSON"),
    ("metrics of another length", lambda c: c.update(metrics="[]"), "holds 0 records for 2 finished phases"),
    ("log a string", lambda c: c.update(log="x"), "'log' must be a list"),
    ("model_state a string", lambda c: c.update(model_state="x"), "'model_state' must map names to tensors"),
    ("optimizer state ill-typed", lambda c: c.update(optimizer_state={"0.weight": 3}), "'optimizer_state' must map"),
    ("config not JSON", lambda c: c.update(config="{"), "'config' is not valid JSON"),
    ("seconds not a number", lambda c: c.update(seconds="x"), "'seconds' must be a finite number"),
    ("flops infinite", lambda c: c.update(flops=float("inf")), "'flops' must be a finite number"),
]


@pytest.mark.parametrize("what,change,message", SCHEMA, ids=[s[0] for s in SCHEMA])
def test_an_ill_formed_checkpoint_is_a_checkpoint_error_naming_the_field(finished_run, tmp_path, what, change,
                                                                        message) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    resave(run, change)
    with pytest.raises(morphir.CheckpointError) as info:
        resume(run)
    assert message in str(info.value), str(info.value)


def test_a_checkpoint_without_checksum_from_before_still_resumes(finished_run, tmp_path, caplog) -> None:
    run = copy_run(finished_run, tmp_path / "old")
    path = run / CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop("checksum")
    config = json.loads(ckpt["config"])  # settings added since, absent from older checkpoints
    for key in ("target_params", "target_flops", "target_phase", "target_factor", "count_growth_flops"):
        config.pop(key)
    config["grower"].pop("init")
    torch.save({**ckpt, "format": 2, "config": json.dumps(config, sort_keys=True)}, path)
    # such a run grew by the λ rule, from random θ: resuming it with today's defaults is refused, saying how
    with pytest.raises(morphir.CheckpointError, match=r"--target-factor none.*init=.random."):
        resume(run)
    from morphir.passes import GaussNewton

    result = resume(run, target_factor=None, method=GaussNewton(init="random"))
    assert len(result.metrics) == 2
    assert "without a checksum" in caplog.text


# -- data --------------------------------------------------------------------------------------------------
def test_complex_and_too_small_data_are_refused(tmp_path) -> None:
    x = torch.randn(40, 1, 8, 8, dtype=torch.complex64)
    torch.save({"x": x, "y": torch.zeros(40, dtype=torch.long)}, tmp_path / "c.pt")
    with pytest.raises(morphir.DataError, match="complex numbers"):
        morphir.load_data(str(tmp_path / "c.pt"))
    torch.save({"x": torch.randn(1, 4), "y": torch.zeros(1, dtype=torch.long), "x_val": torch.randn(3, 4),
                "y_val": torch.zeros(3, dtype=torch.long)}, tmp_path / "one.pt")
    with pytest.raises(morphir.DataError, match="1 training sample is too few"):
        morphir.load_data(str(tmp_path / "one.pt"))
    for bad in (None, ""):
        with pytest.raises(morphir.DataError):
            morphir.load_data(bad)
    for kw in (dict(val_fraction=float("nan")), dict(val_fraction=2), dict(batch_size=0), dict(seed=2**70)):
        with pytest.raises(morphir.DataError):
            morphir.load_data("digits", **kw)


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_a_last_batch_of_one_sample_never_reaches_batch_norm(tmp_path, capsys) -> None:
    torch.save({"x": torch.randn(65, 16), "y": torch.randint(0, 3, (65,)), "x_val": torch.randn(9, 16),
                "y_val": torch.randint(0, 3, (9,))}, tmp_path / "d65.pt")
    data = morphir.load_data(str(tmp_path / "d65.pt"), batch_size=64)
    assert data.train.drop_last and [len(y) for _, y in data.train] == [64]
    torch.save(bn_mlp(), tmp_path / "mlp.pt")
    rc, err = run_cli(["grow", str(tmp_path / "mlp.pt"), "--data", str(tmp_path / "d65.pt"), "--phases", "1",
                       "--phase-epochs", "1", "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err


MODULE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

def odd():  # 65 samples in batches of 64: the last holds one
    ds = TensorDataset(torch.randn(65, 16), torch.randint(0, 3, (65,)))
    return DataLoader(ds, batch_size=64), DataLoader(ds, batch_size=64)

def raises():
    raise KeyError("the data is not here")

def generator():
    return (b for b in []), []

def float_labels():
    return [(torch.randn(4, 16), torch.randn(4))], [(torch.randn(4, 16), torch.randn(4))]

not_a_function = 3
'''


def test_module_function_data_runs_code_and_says_so_when_it_fails(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "user_data.py").write_text(MODULE)
    (tmp_path / "broken_import.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    for spec, message in [("user_data:raises", "the data function raises() raised KeyError"),
                          ("broken_import:f", "cannot import module 'broken_import' (RuntimeError: import-time"),
                          ("user_data:generator", "is an iterator (e.g. a generator)"),
                          ("user_data:not_a_function", "has no function 'not_a_function' (it is a int)"),
                          ("user_data:missing", "has no function 'missing'")]:
        with pytest.raises(morphir.DataError) as info:
            morphir.load_data(spec)
        assert message in str(info.value), str(info.value)
        assert sys.path == path_before  # as it was, whether the import worked or not
    data = morphir.load_data("user_data:odd")
    assert sys.path == path_before and len(data.train.dataset) == 65
    torch.save(bn_mlp(), tmp_path / "mlp.pt")
    base = ["grow", "mlp.pt", "--phases", "1", "--phase-epochs", "1"]
    rc, err = run_cli([*base, "--data", "user_data:odd", "--out", "r1"], capsys)
    assert rc == 1 and "a training batch holds a single sample" in err and "drop_last=True" in err
    assert not (tmp_path / "r1" / CHECKPOINT).exists()  # refused before training
    rc, err = run_cli([*base, "--data", "user_data:float_labels", "--out", "r2"], capsys)
    assert rc == 1 and "integer class indices" in err


def test_training_with_a_loss_that_is_not_one_number_is_a_training_error() -> None:
    train, val = loaders(n=64)
    with pytest.raises(morphir.TrainingError, match="must return one number"):
        morphir.grow(small_net(), train, val, lambda out, y: F.cross_entropy(out, y, reduction="none"), phases=1,
                     phase_epochs=1, progress=False)


# -- reports -----------------------------------------------------------------------------------------------
def test_reports_draw_any_layer_name_as_text(tmp_path) -> None:
    names = ["$\\frac{$", "a$b$c", "x_\\y", "$^$", "<script>alert(1)</script>"]
    record = {"phase": 1, "widths": {n: 3 + i for i, n in enumerate(names)}, "applied": {"sp$lit": 1},
              "chosen": {"sp$lit": {names[0]: [0]}}, "train_loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.5,
              "params": 100}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    png, page = morphir.write_report(tmp_path)
    assert png.stat().st_size > 1000
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    (tmp_path / "metrics.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(morphir.MorphirError, match="nested too deeply|not valid JSON"):
        morphir.write_report(tmp_path)


# -- export ------------------------------------------------------------------------------------------------
def test_export_check_fails_on_a_model_whose_outputs_are_nan(tmp_path, capsys) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        net[1].weight.fill_(float("nan"))
    torch.save(net, tmp_path / "nan.pt")
    rc, err = run_cli(["export", str(tmp_path / "nan.pt"), "--onnx", str(tmp_path / "nan.onnx"), "--check",
                       "--input-shape", "1,1,8,8"], capsys)
    assert rc == 1 and "NaN or infinite" in err
    assert not (tmp_path / "nan.onnx").exists()


def test_export_never_writes_over_a_device_or_a_directory(tmp_path, capsys) -> None:
    (tmp_path / "d.onnx").mkdir()
    for target in (tmp_path / "d.onnx", Path("/dev/null")):
        rc, err = run_cli(["export", "zoo:vgg19", "--onnx", str(target), "--input-shape", "1,1,8,8"], capsys)
        assert rc == 1 and "is not a regular file" in err, err
    assert Path("/dev/null").is_char_device()


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as they do on a full disk (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_exporting_is_a_clear_error_that_keeps_the_old_file(tmp_path, capsys) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8)), torch.randn(1, 1, 8, 8))
    torch.save(g.module, tmp_path / "graph.pt")  # written before the limit
    with file_size_limit(20_000):
        rc, err = run_cli(["export", "zoo:vgg19", "--onnx", str(target), "--check", "--input-shape", "1,1,8,8"],
                          capsys)
        with pytest.raises(morphir.ExportError, match="File too large"):
            morphir.export_program(g, tmp_path / "p.pt2")
    assert rc == 1 and "cannot write the ONNX file" in err and "File too large" in err, err
    assert target.read_bytes() == b"old"
    assert not (tmp_path / "p.pt2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_failed_final_export_keeps_every_other_output_and_says_how_to_retry(tmp_path, monkeypatch, capsys) -> None:
    import morphir.export

    def refuse(*args, **kwargs):
        raise morphir.ExportError("onnxruntime is on strike")

    real = morphir.export.export_onnx
    monkeypatch.setattr(morphir.export, "export_onnx", refuse)
    out = tmp_path / "run"
    rc = main(["grow", "zoo:vgg19", "--phases", "1", "--phase-epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "could not be exported to ONNX: onnxruntime is on strike" in err
    for name in ("grown.pt", "summary.json", "metrics.jsonl", "report.png", "report.html", CHECKPOINT):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exports"]["grown.onnx"].startswith("not written: onnxruntime is on strike")
    retry = err.split("retry the export with:\n")[1].strip()
    assert retry.startswith("morphir export ") and "--check" in retry and "--allow-pickle" in retry
    monkeypatch.setattr(morphir.export, "export_onnx", real)
    assert main(retry.split()[1:]) == 0  # the advice works
    assert (out / "grown.onnx").is_file()


# -- the Python API ----------------------------------------------------------------------------------------
def test_api_misuse_is_a_typed_error() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for bad in (None, 5, ()):
        with pytest.raises(morphir.TraceError, match="example_inputs must be"):
            morphir.trace(net, bad)
    with pytest.raises(morphir.TraceError, match="complex"):
        morphir.trace(net, torch.randn(2, 3, dtype=torch.complex64))
    g = morphir.trace(net, torch.randn(2, 3))
    cands = morphir.candidates(g, "split")
    with pytest.raises(morphir.MorphismError, match="expects a MorphGraph"):
        morphir.candidates(net, "split")
    for bad in (["split"], None, "split"):
        with pytest.raises(morphir.MorphismError, match="candidates"):
            morphir.apply(g, bad)
    with pytest.raises(morphir.MorphismError, match="NaN or infinite"):
        morphir.apply(g, cands[:1], {cands[0]: torch.full((3,), float("inf"))})
    with pytest.raises(morphir.MorphismError, match="theta must be"):
        morphir.apply(g, cands[:1], [torch.zeros(3)])
    for bad in (None, 5, b"net.pt"):
        with pytest.raises(morphir.LoadError):
            morphir.load_model(bad)
    with pytest.raises(morphir.MorphirError, match="path of a run directory"):
        morphir.write_report(None)
    with pytest.raises(morphir.ExportError, match="path must be"):
        morphir.export_onnx(g, None)
    train, val = loaders(n=64)
    for kw, message in [(dict(lr=-1), "lr must be"), (dict(phases="2"), "phases must be an integer"),
                        (dict(momentum=-1), "momentum must be"), (dict(lam=float("nan")), "lam must be"),
                        (dict(phases=1.5), "phases must be an integer"), (dict(bogus=1), "unknown growth option"),
                        (dict(device="gpu"), "is not a device")]:
        with pytest.raises(morphir.MorphirError, match=message):
            morphir.grow(small_net(), train, val, F.cross_entropy, progress=False, **kw)
    with pytest.raises(morphir.DataError, match="yields no batches"):
        morphir.grow(small_net(), [], val, F.cross_entropy, progress=False)
    with pytest.raises(morphir.MorphirError, match="loss_fn must be a callable"):
        morphir.grow(small_net(), train, val, None, progress=False)

    class Empty(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(morphir.MorphirError, match="has no parameters"):
        morphir.grow(Empty(), train, val, F.cross_entropy, progress=False)
