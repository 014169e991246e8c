"""tools/morphism_quality.py (the paper's Appendix C): a quick run prints its table and writes the
bar chart; the chart has one bar per method and channel, at the measured decreases."""

import math
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import morphism_quality as mq  # noqa: E402


def test_quick_run_prints_the_table_and_writes_the_chart(tmp_path, capsys, monkeypatch) -> None:
    seen: dict = {}
    measure_all, plot = mq.measure_all, mq.plot

    def keep_cells(args):
        seen["cells"] = measure_all(args)
        return seen["cells"]

    def keep_figure(cells, out):
        seen["figure"] = plot(cells, out)
        return seen["figure"]

    monkeypatch.setattr(mq, "measure_all", keep_cells)
    monkeypatch.setattr(mq, "plot", keep_figure)
    out = tmp_path / "quality.png"
    code = mq.main(["--quick", "--out", str(out)])
    text = capsys.readouterr().out
    (cell,) = seen["cells"]  # --quick: one layer of one net
    rows = cell.rows
    assert (cell.model, cell.group) == ("vgg19", "features.11.0")  # the middle of vgg19's 16 conv groups
    medians, misses = mq.verdict(seen["cells"])
    assert code == (1 if misses else 0)  # the exit status is the printed verdict
    assert ("gn at least s2d and at least half of direct: " + ("missed" if misses else "ok")) in text
    assert medians["gn"] == pytest.approx(mq.summary(rows)["gn"])  # one layer: its mean is the median
    assert [r.channel for r in rows] == [0, 1, 2, 3]  # --quick: the first 4 channels

    # the PNG is written, and holds one bar per method and channel at the measured decrease
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = seen["figure"].axes[0]
    assert len(ax.patches) == len(mq.METHODS) * len(rows)
    heights = [p.get_height() for p in ax.patches]
    expected = [r.decrease[m] for m in mq.METHODS for r in rows]
    assert heights == pytest.approx(expected)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(mq.METHODS)

    # the printed table: a header, one line per channel with its numbers, the summary line
    lines = text.splitlines()
    table = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        fields = line.split()
        assert int(fields[0]) == r.channel
        assert float(fields[4]) == pytest.approx(r.decrease["gn"], abs=1e-5)
        assert float(fields[8]) == pytest.approx(r.decrease["direct"], abs=1e-5)
    summary = next(line for line in lines if line.startswith("mean true decrease"))
    s = mq.summary(rows)
    assert f"gn {s['gn']:.5f}" in summary and f"direct {s['direct']:.5f}" in summary

    for r in rows:
        assert all(math.isfinite(v) for v in r.decrease.values())
        # every θ lies in the trust region of gn (0.3 ‖w‖); s2d's ε is one of its grid
        assert all(0.0 <= v <= 0.3 + 1e-4 for v in r.radius.values()), r.radius
        assert r.s2d_eps == pytest.approx(r.radius["s2d"], abs=1e-4)
    # direct optimisation starts from gn's and s2d's θ among others and keeps the lowest training
    # loss, so on held-out data it is at least close to the better of the two
    assert s["direct"] >= max(s["gn"], s["s2d"]) - 2e-3


def test_plot_draws_grouped_bars(tmp_path) -> None:
    rows = [mq.Row(c, -1.0, 0.01, 0.1, {"gn": 0.01 * c, "s2d": -0.02, "direct": 0.03}, {m: 0.1 for m in mq.METHODS})
            for c in range(5)]
    fig = mq.plot([mq.Cell("vgg19", "g", rows), mq.Cell("resnet20", "h", rows[:3])], tmp_path / "bars.png")
    assert [len(ax.patches) for ax in fig.axes] == [15, 9]  # one panel per layer
    xs = sorted(p.get_x() + p.get_width() / 2 for p in fig.axes[0].patches)
    assert all(b > a for a, b in zip(xs, xs[1:]))  # no two bars on top of each other
    assert (tmp_path / "bars.png").stat().st_size > 1000
    s = mq.summary(rows)
    assert s["gn_share"] == pytest.approx(sum(0.01 * c for c in range(5)) / 0.15)
    assert s["s2d_share"] == pytest.approx(-0.1 / 0.15)


def test_verdict_takes_the_median_over_layers() -> None:
    def cell(gn: float, s2d: float, direct: float) -> mq.Cell:
        return mq.Cell("m", "g", [mq.Row(0, -1.0, 0.0, 0.1, {"gn": gn, "s2d": s2d, "direct": direct},
                                         {m: 0.1 for m in mq.METHODS})])

    medians, misses = mq.verdict([cell(0.02, 0.01, 0.03), cell(0.0, 0.05, 0.04), cell(0.03, 0.02, 0.05)])
    assert medians == pytest.approx({"gn": 0.02, "s2d": 0.02, "direct": 0.04})
    assert misses == []  # gn's median equals s2d's and is half of direct's
    medians, misses = mq.verdict([cell(0.01, 0.02, 0.01)])
    assert len(misses) == 1 and "below s2d's" in misses[0]
    medians, misses = mq.verdict([cell(0.01, 0.0, 0.03)])
    assert len(misses) == 1 and "half of direct's" in misses[0]
