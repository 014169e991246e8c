"""Smoke test of tools/bench_growth.py: a tiny run prints the four arms, pairs them, and its exit
status agrees with the bounds it prints."""

import re
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import bench_growth  # noqa: E402


def test_tiny_run_reports_every_arm(capsys):
    rc = bench_growth.main(["--seeds", "2", "--phases", "2", "--phase-epochs", "1"])
    out = capsys.readouterr().out
    rows = {m[1].strip(): (float(m[2]), int(m[3].replace(",", "")))
            for m in re.finditer(r"^\| ([^|]+?)\s*\|\s+([\d.]+) ± [\d.]+ \|\s+([\d,]+) \|", out, re.M)}
    assert set(rows) == set(bench_growth.ARMS), out
    seed_params = sum(p.numel() for p in bench_growth.build(0).parameters())
    assert rows["(a) seed"][1] == seed_params
    assert rows["grown"][1] > seed_params  # it grew
    # each seed's fixed-width net is the vgg19 width closest to that seed's grown net
    sizes = [sum(p.numel() for p in bench_growth.build(0, w).parameters()) for w in range(2, 65)]
    per_seed = re.findall(r"^seed \d+: grown [\d.]+ \(([\d,]+) params\).*\(b\) fixed [\d.]+ \(([\d,]+) params\)",
                          out, re.M)
    assert len(per_seed) == 2, out
    for grown, fixed in per_seed:
        grown, fixed = int(grown.replace(",", "")), int(fixed.replace(",", ""))
        assert fixed in sizes and abs(fixed - grown) == min(abs(s - grown) for s in sizes)
    assert all(0 <= acc <= 100 for acc, _ in rows.values())
    assert len(re.findall(r"^grown - \((b|c)\) \w+: [+-]\d+\.\d+ ± \d+\.\d+ points", out, re.M)) == 2
    passed = rows["grown"][0] >= rows["(b) fixed"][0] - 0.5 and rows["grown"][0] > rows["(c) noise"][0]
    assert rc == (0 if passed else 1)
    assert ("all bounds met" in out) == passed
