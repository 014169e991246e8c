"""Smoke test of tools/bench_growth.py: a quick run prints every arm of a task, pairs them, grows the
random-θ arm exactly as much as the grown one, and its exit status agrees with the bounds it prints."""

import re
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import bench_growth  # noqa: E402


def test_quick_run_reports_every_arm_and_agrees_with_its_bounds(capsys):
    rc = bench_growth.main(["--quick", "--tasks", "teacher"])
    out = capsys.readouterr().out
    rows = {m[1]: (float(m[2]), int(m[3].replace(",", "")))
            for m in re.finditer(r"^\| ([\w\- ]+?) \| ([\d.]+) ± [\d.]+ \| - \| ([\d,]+) \|", out, re.M)}
    assert set(rows) == set(bench_growth.ARMS), out
    assert rows["seed"][1] == 274 and rows["4x wide"][1] == 1066  # the teacher's 8-unit seed, and at 32 units
    assert rows["grown"][1] > rows["seed"][1]
    assert rows["random-theta"][1] == rows["grown"][1] == rows["retrained"][1]  # equal growth
    assert abs(rows["fixed"][1] - rows["grown"][1]) <= 33  # the closest mlp: 33 parameters a hidden unit
    assert len(re.findall(r"^(seed|fixed|random-theta|fixed-flops|retrained) - (grown|4x wide): [+-]\d+\.\d+ ± "
                          r"\d+\.\d+ val loss", out, re.M)) == 6
    flops = {m[1]: float(m[2]) for m in re.finditer(r"^\| ([\w\- ]+?) \|(?: [^|]+ \|){3} ([\d.e+]+) \|", out, re.M)}
    # retrained trains the grown architecture at full size from the first epoch: it costs what the
    # fixed net of (about) that size costs, not what the grown run (small at first) cost
    assert abs(flops["retrained"] / flops["fixed"] - rows["grown"][1] / rows["fixed"][1]) < 0.05, flops
    shares = dict(re.findall(r"^\| ([\w\- ]+?) \|.*\| (\d+ %|-) \|$", out, re.M))
    assert set(shares) == set(bench_growth.ARMS) and shares["retrained"] == "-" and shares["seed"] == "0 %"
    checks = re.findall(r"^  (ok  |MISS) \(", out, re.M)
    assert len(checks) == 6
    assert rc == (1 if "MISS" in checks or "FAILED" in out else 0)
    assert ("all bounds met" in out) == (rc == 0)


def test_widths_scale_and_sizes_match():
    assert bench_growth.scaled("zoo:mlp:16,16", 4) == "zoo:mlp:64,64"
    assert bench_growth.scaled("zoo:vgg19", 0.25) == "zoo:vgg19:4"
    spec = bench_growth.sized("zoo:mlp:8", (20,), 10, 703)
    assert spec == "zoo:mlp:21"  # 21 hidden units: 703 parameters


def test_duplicate_share_counts_split_copies_until_they_separate():
    import morphir
    import torch

    graph = morphir.trace(bench_growth.build("zoo:mlp:8", (20,), 10, 0), torch.randn(2, 20))
    assert bench_growth.duplicate_share(graph) == 0.0
    split = morphir.candidates(graph, "split")[0]
    grown = morphir.apply(graph, [split])  # θ = 0: the two copies point the same way
    assert bench_growth.duplicate_share(grown) == 2 / 9
