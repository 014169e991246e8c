"""The `morphir` command: inspect, safe loading, and errors with a non-zero exit."""

import json
from pathlib import Path
import subprocess
import sys

import torch
import torch.nn as nn

from morphir.cli import main


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def test_inspect_json_is_valid_and_complete(capsys) -> None:
    assert main(["inspect", "zoo:vgg19", "--input-shape", "1,3,32,32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nodes"] == 57 and report["params"] == 35674
    growable = [g for g in report["groups"] if g["growable"]]
    assert len(growable) == 16 and all(g["width"] == 16 for g in growable)
    assert report["candidates"] == {"split": 256, "prune": 256, "deepen": 32, "add_channel": 256}
    blocked = {g["name"]: g["blocked"] for g in report["groups"] if not g["growable"]}
    assert blocked == {"@x": ["network input"], "classifier": ["network output"]}
    assert report["fidelity"] == {"eval_error": 0.0, "train_error": 0.0, "leaves": [], "fixed_args": [],
                                  "notes": []}


def test_inspect_reports_the_fidelity_check_and_what_it_kept_whole(tmp_path, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lookalikes import EfficientNetLike

    torch.save(EfficientNetLike(), tmp_path / "eff.pt")
    assert main(["inspect", str(tmp_path / "eff.pt"), "--input-shape", "1,3,8,8", "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "fidelity: the traced graph computes what the model computes (eval mode max |Δ| 0, train mode max " \
           "|Δ| 0); kept whole, as they read their training flag: blocks.0.stochastic_depth, " \
           "blocks.1.stochastic_depth" in out


def test_inspect_table_shows_groups_and_reasons(capsys) -> None:
    assert main(["inspect", "zoo:resnet20", "--input-shape", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "14 channel groups (12 growable)" in out
    assert "no: network input" in out and "candidates: split 448, prune 448, deepen 47" in out


def test_torch_nn_file_loads_safely_and_custom_classes_need_allow_pickle(tmp_path, capsys) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 2)), plain)
    assert main(["inspect", str(plain), "--input-shape", "1,3,8,8", "--json"]) == 0
    groups = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert groups["0"]["growable"] and groups["0"]["consumers"][0]["inner"] == 36

    custom = tmp_path / "custom.pt"
    torch.save(Custom(), custom)
    assert main(["inspect", str(custom), "--input-shape", "1,3,8,8"]) == 1
    err = capsys.readouterr().err
    assert "Custom" in err and "--allow-pickle" in err
    assert main(["inspect", str(custom), "--input-shape", "1,3,8,8", "--allow-pickle"]) == 0


def test_errors_exit_non_zero_with_a_message(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "missing.pt"), "--input-shape", "1,3,8,8"]) == 1
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save(nn.Linear(4, 2), plain)
    assert main(["inspect", str(plain)]) == 1
    assert "--input-shape" in capsys.readouterr().err
    assert main(["inspect", str(plain), "--input-shape", "1,5"]) == 1
    assert "do not fit" in capsys.readouterr().err
    assert main(["inspect", "zoo:nope"]) == 1
    assert "vgg19" in capsys.readouterr().err


def test_console_script_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "morphir.cli", "inspect", "zoo:densenet", "--input-shape", "1,1,8,8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "growable" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "morphir.cli", "inspect", "zoo:vgg19", "--input-shape", "a,b"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a shape" in bad.stderr


def small_model_file(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)), path)
    return str(path)


def test_score_json_with_exact_and_plot(tmp_path, capsys) -> None:
    plot = tmp_path / "s.png"
    code = main(["score", small_model_file(tmp_path), "--data", "digits", "--epochs", "1", "--batches", "2",
                 "--exact", "--json", "--plot", str(plot)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["candidates"]
    assert sorted({r["morphism"] for r in rows}) == ["prune", "split"] and len(rows) == 8
    assert all(isinstance(r["estimate"], float) and isinstance(r["exact"], float) for r in rows)
    assert set(report["spearman"]) == {"split@0", "prune@0"}
    assert all(-1.0 <= v <= 1.0 for v in report["spearman"].values())
    assert 0.0 <= report["val_accuracy"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_table_and_argument_errors(tmp_path, capsys) -> None:
    model = small_model_file(tmp_path)
    assert main(["score", model, "--epochs", "0", "--batches", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "8 candidates scored on 1 batches" in out and len(out.strip().splitlines()) == 2 + 3
    assert main(["score", model, "--plot", str(tmp_path / "p.png")]) == 1
    assert "--exact" in capsys.readouterr().err
    assert main(["score", "zoo:vgg19", "--morphisms", "nope", "--epochs", "0", "--batches", "1"]) == 1
    assert "unknown morphism 'nope'" in capsys.readouterr().err
