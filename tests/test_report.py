"""morphir.report: reading a growth run directory, the growth plot and the self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from morphir.errors import MorphirError
from morphir.report import plot_growth, read_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["features.0.0", "features.1.0", "new.conv", "<b>", "classifier"]  # network order

# 3 phases; "new.conv" appears in phase 2; split/prune chosen at the end of phase 2 (last but one)
PHASES = [
    {"phase": 1, "epochs": 4, "train_loss": 1.9, "val_loss": 1.7, "val_accuracy": 0.41, "params": 12345,
     "flops": 456789, "seconds": 12.5,
     "widths": {"features.0.0": 16, "features.1.0": 16, "<b>": 8, "classifier": 10},
     "applied": {"split": 4}, "chosen": {"split": {"features.0.0": [0, 1, 2, 3]}}},
    {"phase": 2, "epochs": 4, "train_loss": 1.2, "val_loss": 1.1, "val_accuracy": 0.62, "params": 15001,
     "flops": 512000, "seconds": 13.0,
     "widths": {"features.0.0": 20, "features.1.0": 17, "new.conv": 4, "<b>": 8, "classifier": 10},
     "applied": {"split": 5, "prune": 2},
     "chosen": {"split": {"features.0.0": [1, 5, 9], "new.conv": [0, 2]}, "prune": {"features.1.0": [3, 4]}}},
    {"phase": 3, "epochs": 4, "train_loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.71, "params": 16002,
     "flops": 533000, "seconds": 12.0,
     "widths": {"features.0.0": 23, "features.1.0": 15, "new.conv": 6, "<b>": 8, "classifier": 10},
     "applied": {}},
]
SUMMARY = {"model": "zoo:vgg19", "seed_params": 12345, "final_params": 16002, "final_flops": 533000,
           "val_accuracy": 0.71, "val_loss": 0.9, "phases": 3, "seconds": 37.5, "lam": 0.001,
           "resource": "params", "retrain": {"val_accuracy": 0.74, "val_loss": 0.8}}


def make_run(root: Path, phases: list[dict] = PHASES, summary: dict | None = SUMMARY) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in phases), encoding="utf-8")
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return root


def png_array(data: bytes) -> np.ndarray:
    assert data[:8] == PNG_MAGIC
    return matplotlib.image.imread(io.BytesIO(data), format="png")


class Tables(HTMLParser):
    """Text of every cell of every table with an id: {id: [[cell text, ...] per row]}; also every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.srcs: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.srcs.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Tables:
    parser = Tables()
    parser.feed(page)
    return parser


# ---------------------------------------------------------------------------------------------
# read_run


def test_read_run_returns_phases_and_summary(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "\n\n", encoding="utf-8")  # blank lines
    metrics, summary = read_run(run)
    assert [m["phase"] for m in metrics] == [1, 2, 3]
    assert metrics[1]["widths"]["new.conv"] == 4
    assert summary["model"] == "zoo:vgg19" and summary["retrain"]["val_accuracy"] == 0.74


def test_read_run_without_summary_returns_empty_summary(tmp_path):
    metrics, summary = read_run(make_run(tmp_path / "run", summary=None))
    assert summary == {} and len(metrics) == 3


@pytest.mark.parametrize("bad, why", [
    ('{"phase": 2, "widths": {', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"phase": 2, "widths": [16, 16]}', "'widths' must map"),
    ('{"phase": 2, "widths": {"a": -1}}', "width of 'a'"),
    ('{"phase": 2, "widths": {"a": 3}, "chosen": {"split": {"a": ["x"]}}}', "chosen['split']['a']"),
])
def test_corrupt_metrics_line_names_file_and_line(tmp_path, bad, why):
    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = bad
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MorphirError) as info:
        read_run(run)
    message = str(info.value)
    assert "metrics.jsonl, line 2" in message and why in message
    assert "morphir grow output directory" in message
    with pytest.raises(MorphirError, match="line 2"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_missing_or_corrupt_files_raise_morphir_error(tmp_path):
    with pytest.raises(MorphirError, match="no such directory"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MorphirError, match=r"metrics\.jsonl: not found; is this a morphir grow output directory"):
        read_run(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    (run / "summary.json").write_text('{"model": "zoo:vgg19",')
    with pytest.raises(MorphirError, match=r"summary\.json: not valid JSON"):
        read_run(run)
    (run / "summary.json").write_text("[]")
    with pytest.raises(MorphirError, match=r"summary\.json: expected a JSON object"):
        read_run(run)
    (run / "summary.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(MorphirError, match=r"summary\.json: not UTF-8"):
        read_run(run)


# ---------------------------------------------------------------------------------------------
# plot_growth


def test_plot_growth_writes_a_png_and_leaves_the_backend_alone(tmp_path):
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # raw value: reading it must not resolve it
    out = plot_growth(PHASES, tmp_path / "growth.png")
    assert out == tmp_path / "growth.png"
    image = png_array(out.read_bytes())
    height, width = image.shape[:2]
    assert 300 < height < 2000 and 500 < width < 4000 and image.shape[2] in (3, 4)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert sorted(os.listdir(tmp_path)) == ["growth.png"]  # no temp file left behind


def test_plot_growth_draws_the_chosen_channels(tmp_path):
    without = [{k: v for k, v in p.items() if k != "chosen"} for p in PHASES]
    with_chosen = png_array(plot_growth(PHASES, tmp_path / "a.png").read_bytes())
    plain = png_array(plot_growth(without, tmp_path / "b.png").read_bytes())
    assert with_chosen.shape[0] > plain.shape[0]  # the split/prune panel adds height
    # split (green) and prune (red) bars both appear: tab:green = (44, 160, 44), tab:red = (214, 39, 40)
    rgb = (with_chosen[..., :3] * 255).round().astype(int)
    for colour in ((44, 160, 44), (214, 39, 40)):
        assert (np.abs(rgb - colour).sum(axis=-1) < 6).sum() > 50, colour
    rgb_plain = (plain[..., :3] * 255).round().astype(int)
    assert (np.abs(rgb_plain - (214, 39, 40)).sum(axis=-1) < 6).sum() == 0


def test_plot_growth_overwrites_atomically_and_reports_write_errors(tmp_path):
    target = tmp_path / "report.png"
    target.write_bytes(b"old")
    plot_growth(PHASES, target)
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(MorphirError, match="cannot write .*missing"):
        plot_growth(PHASES, tmp_path / "missing" / "report.png")
    with pytest.raises(MorphirError, match="no phases"):
        plot_growth([], target)
    with pytest.raises(MorphirError, match=r"metrics\[1\]: 'widths' must map"):
        plot_growth([PHASES[0], {"widths": [1]}], target)
    assert sorted(os.listdir(tmp_path)) == ["report.png"]


def test_plot_growth_handles_many_long_layer_names(tmp_path):
    names = [f"backbone.stage{i // 4}.block{i % 4}.conv2" for i in range(60)]
    phases = [{"phase": k, "widths": {n: 8 + k * (i % 3) for i, n in enumerate(names[: 40 + 10 * k])}}
              for k in range(3)]
    image = png_array(plot_growth(phases, tmp_path / "wide.png").read_bytes())
    assert image.shape[1] > image.shape[0]


# ---------------------------------------------------------------------------------------------
# write_report


def test_write_report_is_a_self_contained_page(tmp_path):
    run = make_run(tmp_path / "run")
    png, page_path = write_report(run)
    assert (png, page_path) == (run / "report.png", run / "report.html")
    png_array(png.read_bytes())
    page = page_path.read_text(encoding="utf-8")
    doc = parse(page)

    assert "<h1>morphir growth report: zoo:vgg19</h1>" in page
    # nothing external: every image is an embedded PNG, no links, scripts or URLs
    assert len(doc.srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in doc.srcs)
    images = [base64.b64decode(s.split(",", 1)[1], validate=True) for s in doc.srcs]
    assert png.read_bytes() in images
    for data in images:
        assert png_array(data).shape[0] > 200
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:image/png;base64,)""", page, re.I)
    for external in ("http:", "https:", "<link", "<script", "url(", "@import"):
        assert external not in page.lower()

    # escaped: the layer "<b>" is text, not a tag
    assert "<b>" not in page and "&lt;b&gt;" in page

    summary = {row[0]: row[1] for row in doc.tables["summary"]}
    assert summary["model"] == "zoo:vgg19" and summary["final_params"] == "16,002"
    assert summary["retrain val_accuracy"] == "0.74"

    arch = doc.tables["architecture"]
    assert arch[0] == ["layer", "phase 1", "phase 2", "phase 3"]
    cells = {row[0]: row[1:] for row in arch[1:]}
    assert list(cells) == LAYERS + ["total channels"]  # new.conv where phase 2 puts it, not last
    assert cells["features.0.0"] == ["16 +4", "20 +3", "23"]
    assert cells["features.1.0"] == ["16", "17 \u22122", "15"]
    assert cells["new.conv"] == ["\u2013", "4 +2", "6"]  # not there in phase 1
    assert cells["<b>"] == ["8", "8", "8"]
    assert cells["total channels"] == ["50", "59", "62"]

    metrics = {row[0]: row[1:] for row in doc.tables["metrics"]}
    assert metrics["phase"][:4] == ["epochs", "train loss", "val loss", "val accuracy"]
    assert metrics["2"][-1] == "split 5, prune 2" and metrics["3"][3] == "0.71"
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "report.html", "report.png", "summary.json"]


def test_write_report_without_summary_and_sparse_metrics(tmp_path):
    phases = [{"widths": {"a": 4}}, {"phase": 2, "widths": {"stem": 3, "a": 6, "b": 2}, "val_accuracy": 0.5}]
    run = make_run(tmp_path / "in-progress", phases, summary=None)
    png, page_path = write_report(run)
    page = page_path.read_text(encoding="utf-8")
    doc = parse(page)
    assert "morphir growth report: in-progress" in page and "No summary.json yet" in page
    assert "summary" not in doc.tables
    cells = {row[0]: row[1:] for row in doc.tables["architecture"][1:]}
    assert list(cells) == ["stem", "a", "b", "total channels"]  # a new first layer goes first
    assert cells == {"stem": ["\u2013", "3"], "a": ["4", "6"], "b": ["\u2013", "2"], "total channels": ["4", "11"]}
    assert doc.tables["metrics"][0] == ["phase", "val accuracy"]
    assert [row[0] for row in doc.tables["metrics"][1:]] == ["1", "2"]
    png_array(png.read_bytes())


def test_write_report_escapes_the_model_name_and_refuses_an_empty_run(tmp_path):
    run = make_run(tmp_path / "run", summary={"model": 'my<"model">&co'})
    page = write_report(run)[1].read_text(encoding="utf-8")
    assert "my&lt;&quot;model&quot;&gt;&amp;co" in page and 'my<"model">' not in page
    empty = make_run(tmp_path / "empty", phases=[], summary=None)
    with pytest.raises(MorphirError, match="no phase recorded yet"):
        write_report(empty)
    assert not (empty / "report.html").exists() and not (empty / "report.png").exists()
