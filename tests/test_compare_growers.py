"""tools/compare_growers.py: every grower under one FLOPs budget per task, one table per task."""

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import compare_growers as cg  # noqa: E402


def test_quick_run_tables_every_method_of_every_task_within_its_budget(tmp_path, capsys) -> None:
    out, plot = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert cg.main(["--quick", "--tasks", "teacher,clusters", "--methods", "gn,random", "--out", str(out),
                    "--plot", str(plot)]) == 0
    text = out.read_text()
    assert "### teacher (zoo:mlp:8 seed" in text and "### clusters (zoo:mlp:16,16 seed" in text
    budgets = {t: cg.budget_for(t, 4, 2.0) for t in ("teacher", "clusters")}
    for task in budgets:
        section = text.split(f"### {task}")[1].split("###")[0]
        rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "method" not in line]
        assert sorted(r[0].strip() for r in rows) == ["gn", "random"]
        losses = [float(r[1].split("±")[0]) for r in rows]
        assert losses == sorted(losses)  # best val loss first
        for r in rows:  # each run ends when its budget is spent (a growth step that spends the rest is
            # charged, not applied, so a run can end above it by that step's cost)
            assert float(r[4]) >= budgets[task] * 0.999
        accuracy = [r[2].strip() for r in rows]
        assert all(a == "-" for a in accuracy) if task == "teacher" else all("±" in a for a in accuracy)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cg.main(["--tasks", "mnist"]) == 2
    assert "unknown methods or tasks ['mnist']" in capsys.readouterr().err
