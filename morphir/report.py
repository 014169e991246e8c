"""Reports of a growth run: read its directory, plot how the layers grew, write a one-file HTML page.

A ``morphir grow`` output directory holds ``metrics.jsonl`` (one JSON object per phase: losses,
accuracy, params, ``widths`` per channel group, the morphisms ``applied`` and the channel indices
``chosen`` at the end of the phase) and, once the run has finished, ``summary.json``.

>>> from morphir.report import read_run, plot_growth, write_report
>>> metrics, summary = read_run("runs/vgg19")
>>> png, page = write_report("runs/vgg19")      # runs/vgg19/report.png, runs/vgg19/report.html

Plots are drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas, so the process-wide
matplotlib backend (and ``pyplot``'s figure registry) is never touched. Files are written to a
temporary file in the same directory and moved into place, so a reader never sees half a file.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import matplotlib
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from morphir.errors import MorphirError
from morphir.files import atomic_write

__all__ = ["read_run", "plot_growth", "write_report"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"

_WHAT_TO_DO = "is this a morphir grow output directory? Fix or delete the file, or rerun `morphir grow`"
# morphisms that remove channels: drawn below the axis and written −n; every other one adds channels
_SHRINKING = ("prune",)
_MORPHISM_COLOURS = {"split": "tab:green", "prune": "tab:red"}
_OTHER_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_MINUS = "\u2212"


# ---------------------------------------------------------------------------------------------
# reading


def read_run(run_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The phases of ``metrics.jsonl`` and the ``summary.json`` of a growth run directory.

    ``summary.json`` may be missing (the run is still going): the summary is then ``{}``.
    Blank lines are skipped. Raises :class:`~morphir.errors.MorphirError` naming the file (and the
    line) when the directory or ``metrics.jsonl`` is missing, or a file is not the JSON it should be.

    >>> metrics, summary = read_run("runs/vgg19")
    >>> [m["widths"]["features.0.0"] for m in metrics], summary.get("final_params")
    ([16, 19, 23], 1234567)
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise MorphirError(f"read_run expects the path of a run directory, got {type(run_dir).__name__}")
    root = Path(run_dir)
    if not root.is_dir():
        raise MorphirError(f"{root}: no such directory; give the output directory of `morphir grow`")
    metrics_path = root / METRICS_FILE
    if not metrics_path.is_file():
        raise MorphirError(f"{metrics_path}: not found; is this a morphir grow output directory? "
                           "(a run writes it when its first phase ends)")
    text = _read_text(metrics_path)
    metrics: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metrics_path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MorphirError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}); {_WHAT_TO_DO}") from None
        except RecursionError:
            raise MorphirError(f"{where}: JSON nested too deeply to be a phase record; {_WHAT_TO_DO}") from None
        _check_phase(obj, where)
        metrics.append(obj)

    summary_path = root / SUMMARY_FILE
    if not summary_path.exists():
        logger.info("%s: no %s yet (run still in progress?)", root, SUMMARY_FILE)
        return metrics, {}
    try:
        summary = json.loads(_read_text(summary_path))
    except RecursionError:
        raise MorphirError(f"{summary_path}: JSON nested too deeply to be a run summary; {_WHAT_TO_DO}") from None
    except json.JSONDecodeError as exc:
        raise MorphirError(f"{summary_path}: not valid JSON ({exc.msg}, line {exc.lineno}); {_WHAT_TO_DO}") from None
    if not isinstance(summary, dict):
        raise MorphirError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}; {_WHAT_TO_DO}")
    return metrics, summary


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MorphirError(f"{path}: not UTF-8 text (byte {exc.start}); {_WHAT_TO_DO}") from None
    except OSError as exc:
        raise MorphirError(f"{path}: cannot read it ({exc.strerror or exc}); "
                           "check the path and its permissions") from None


def _check_phase(obj: Any, where: str) -> None:
    """Raise MorphirError at ``where`` unless ``obj`` is a phase record with well-formed widths and chosen."""
    if not isinstance(obj, dict):
        raise MorphirError(f"{where}: expected a JSON object per phase, got {type(obj).__name__}; {_WHAT_TO_DO}")
    widths = obj.get("widths")
    if widths is not None:
        if not isinstance(widths, dict):
            raise MorphirError(f"{where}: 'widths' must map layer -> width, got {type(widths).__name__}; {_WHAT_TO_DO}")
        for name, width in widths.items():
            if not _is_count(width):
                raise MorphirError(f"{where}: width of {name!r} must be a whole number >= 0, got {width!r}; "
                                   f"{_WHAT_TO_DO}")
    chosen = obj.get("chosen")
    if chosen is not None:
        if not isinstance(chosen, dict):
            raise MorphirError(f"{where}: 'chosen' must map morphism -> {{layer: [channel, ...]}}, "
                               f"got {type(chosen).__name__}; {_WHAT_TO_DO}")
        for morphism, per_layer in chosen.items():
            if not isinstance(per_layer, dict):
                raise MorphirError(f"{where}: chosen[{morphism!r}] must map layer -> [channel, ...], "
                                   f"got {type(per_layer).__name__}; {_WHAT_TO_DO}")
            for name, channels in per_layer.items():
                if not (_is_count(channels) or (isinstance(channels, list) and all(map(_is_count, channels)))):
                    raise MorphirError(f"{where}: chosen[{morphism!r}][{name!r}] must be a list of channel "
                                       f"indices, got {channels!r}; {_WHAT_TO_DO}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------------------------
# what the records say


def _phase_label(metrics: Sequence[Mapping[str, Any]], i: int) -> str:
    return str(metrics[i].get("phase", i + 1))


def _layers(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every layer (channel group) in network order, each phase's layers in the order they first appear.

    A layer new in a later phase goes right after the layer that precedes it in that phase's
    ``widths`` (which are in network order), not at the end: a layer inserted by growth is drawn
    where it sits in the network. Layers only named in ``chosen`` come last.
    """
    order: list[str] = []
    for m in metrics:
        previous: str | None = None
        for name in m.get("widths") or {}:
            if name not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    seen = dict.fromkeys(order)
    for m in metrics:
        for per_layer in (m.get("chosen") or {}).values():
            seen.update(dict.fromkeys(per_layer))
    return list(seen)


def _chosen_counts(record: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{morphism: {layer: number of channels}}`` chosen at the end of one phase (empty entries dropped)."""
    counts: dict[str, dict[str, int]] = {}
    for morphism, per_layer in (record.get("chosen") or {}).items():
        per = {name: (len(ch) if isinstance(ch, (list, tuple)) else int(ch)) for name, ch in (per_layer or {}).items()}
        per = {name: n for name, n in per.items() if n}
        if per:
            counts[morphism] = per
    return counts


def _shrinks(morphism: str) -> bool:
    return morphism.startswith(_SHRINKING)


def _colours(morphisms: Sequence[str]) -> dict[str, str]:
    others = iter(_OTHER_COLOURS * (1 + len(morphisms) // len(_OTHER_COLOURS)))
    return {m: _MORPHISM_COLOURS.get(m) or next(others) for m in morphisms}


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


# ---------------------------------------------------------------------------------------------
# plots


def _plain_text(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``draw`` with matplotlib's mathtext off: layer and morphism names come from the user
    (``$``, ``\\`` and ``_`` in them are text, never a formula that fails to parse)."""

    @functools.wraps(draw)
    def plain(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain



@_plain_text
def plot_growth(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Draw each layer's width in every phase, and the channels chosen to split and prune; write a PNG.

    The x axis lists the layers in network order (a layer new in a later phase is placed where
    that phase's ``widths`` put it); one line per phase (early phases
    light, late phases dark; a layer missing from a phase counts as width 0). Below it, for the
    last phase with ``chosen`` channels, bars count the channels chosen per layer: split upwards,
    prune downwards. The file is written atomically.

    >>> metrics, _ = read_run("runs/vgg19")
    >>> plot_growth(metrics, "runs/vgg19/report.png")
    PosixPath('runs/vgg19/report.png')
    """
    target = Path(path)
    if not metrics:
        raise MorphirError(f"no phases to plot for {target}: metrics.jsonl is empty; wait for the first phase to end")
    for i, record in enumerate(metrics):
        _check_phase(record, f"metrics[{i}]")
    layers = _layers(metrics)
    if not layers:
        raise MorphirError(f"no layer widths to plot for {target}: no phase has 'widths'; "
                           "is this the metrics.jsonl of a morphir grow run?")
    last_chosen = next((i for i in reversed(range(len(metrics))) if _chosen_counts(metrics[i])), None)

    fig = Figure(figsize=(min(30.0, max(7.0, 0.32 * len(layers) + 3.5)), 6.2 if last_chosen is not None else 4.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    if last_chosen is None:
        ax_w, ax_c = fig.subplots(), None
    else:
        ax_w, ax_c = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    x = list(range(len(layers)))
    cmap = colormaps["viridis"]
    n = len(metrics)
    for i, record in enumerate(metrics):
        widths = record.get("widths") or {}
        colour = cmap(0.85 - 0.75 * (i / (n - 1)) if n > 1 else 0.45)  # light (early) to dark (late)
        ax_w.plot(x, [widths.get(name, 0) for name in layers], marker="o", markersize=3, linewidth=1.4,
                  color=colour, label=f"phase {_phase_label(metrics, i)}")
    ax_w.set_ylabel("channels")
    ax_w.set_title("layer widths per phase")
    ax_w.set_ylim(bottom=0)
    ax_w.grid(axis="y", alpha=0.3)
    ax_w.legend(fontsize=8, ncol=max(1, math.ceil(n / 12)), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0.0)

    bottom = ax_w
    if ax_c is not None and last_chosen is not None:
        bottom = ax_c
        counts = _chosen_counts(metrics[last_chosen])
        growing = [m for m in counts if not _shrinks(m)]
        shrinking = [m for m in counts if _shrinks(m)]
        colours = _colours(list(counts))
        bar = 0.8 / max(len(growing), len(shrinking), 1)
        for side, names in ((1, growing), (-1, shrinking)):
            for k, morphism in enumerate(names):
                offset = (k - (len(names) - 1) / 2) * bar
                per = counts[morphism]
                total = sum(per.values())
                ax_c.bar([xi + offset for xi in x], [side * per.get(name, 0) for name in layers], width=bar,
                         color=colours[morphism], label=f"{morphism}: {total} channel{'s' * (total != 1)}")
        ax_c.axhline(0, color="black", linewidth=0.8)
        ax_c.set_ylabel(f"channels (prune {_MINUS})")
        ax_c.set_title(f"channels chosen at the end of phase {_phase_label(metrics, last_chosen)}", fontsize=10)
        ax_c.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_c.grid(axis="y", alpha=0.3)
        ax_c.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)

    longest = max(len(name) for name in layers)
    rotation = 0 if longest <= 6 and len(layers) <= 12 else (45 if longest <= 14 else 70)
    bottom.set_xticks(x)
    bottom.set_xticklabels(layers, rotation=rotation, ha="right" if rotation else "center",
                           rotation_mode="anchor", fontsize=8 if len(layers) <= 40 else 6)
    bottom.set_xlabel("layer (channel group)")
    _atomic_write(target, lambda f: fig.savefig(f, format="png", dpi=110))
    fig.clear()  # a Figure without pyplot is not registered anywhere: dropping it frees it
    logger.info("wrote %s (%d layers, %d phases)", target, len(layers), n)
    return target


@_plain_text
def _metrics_png(metrics: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> bytes:
    """PNG bytes of val accuracy, train/val loss and params against phase."""
    fig = Figure(figsize=(11.0, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_loss, ax_params = fig.subplots(1, 3)
    phases = [_number(m.get("phase", i + 1)) for i, m in enumerate(metrics)]
    if any(math.isnan(p) for p in phases):
        phases = [float(i + 1) for i in range(len(metrics))]

    def series(key: str) -> list[float]:
        return [_number(m.get(key)) for m in metrics]

    def draw(ax: Any, key: str, label: str, **style: Any) -> bool:
        ys = series(key)
        if all(math.isnan(y) for y in ys):
            return False
        ax.plot(phases, ys, marker="o", markersize=4, label=label, **style)
        return True

    panels = [
        (ax_acc, "validation accuracy", [("val_accuracy", "val accuracy", {"color": "tab:blue"})]),
        (ax_loss, "loss", [("train_loss", "train loss", {"color": "tab:orange"}),
                           ("val_loss", "val loss", {"color": "tab:blue"})]),
        (ax_params, "parameters", [("params", "params", {"color": "tab:green"})]),
    ]
    for ax, title, lines in panels:
        drawn = [draw(ax, key, label, **style) for key, label, style in lines]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("phase")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not any(drawn):
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif len(lines) > 1:
            ax.legend(fontsize=8)
    retrain = summary.get("retrain")
    if isinstance(retrain, Mapping) and not math.isnan(_number(retrain.get("val_accuracy"))):
        ax_acc.axhline(_number(retrain["val_accuracy"]), color="tab:purple", linestyle="--", linewidth=1,
                       label="after retraining")
        ax_acc.legend(fontsize=8)
    ax_params.yaxis.set_major_formatter(EngFormatter())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    fig.clear()
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# the HTML page


def write_report(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Regenerate ``report.png`` and write ``report.html`` in a growth run directory.

    The page is self-contained (images are embedded as base64 data URIs, no external file or
    network reference): the summary, the architecture per phase (widths, with +n/−n for the
    channels split/pruned at the end of each phase), the metrics per phase with a figure of
    accuracy, losses and params against phase, and ``report.png``. Works while the run is in
    progress (no ``summary.json`` yet).

    >>> png, page = write_report("runs/vgg19")
    >>> page.name, png.name
    ('report.html', 'report.png')
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise MorphirError(f"write_report expects the path of a run directory, got {type(run_dir).__name__}")
    root = Path(run_dir)
    metrics, summary = read_run(root)
    if not metrics:
        raise MorphirError(f"{root / METRICS_FILE}: no phase recorded yet; write the report after the first phase")
    png = plot_growth(metrics, root / REPORT_PNG)
    try:
        growth_png = png.read_bytes()
    except OSError as exc:
        raise MorphirError(f"{png}: cannot read back the plot just written ({exc.strerror or exc})") from None
    page = _html(root, metrics, summary, growth_png, _metrics_png(metrics, summary))
    target = root / REPORT_HTML
    _atomic_write(target, lambda f: f.write(page.encode("utf-8")))
    logger.info("wrote %s", target)
    return png, target


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
.grow { color: #1a7f37; font-weight: 600; }
.shrink { color: #c0392b; font-weight: 600; }
.absent { color: #aaa; }
.note { color: #666; }
img { max-width: 100%; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A cell's text (not yet escaped)."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:,.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _summary_table(summary: Mapping[str, Any]) -> str:
    if not summary:
        return f'<p class="note">No {SUMMARY_FILE} yet: the run is still in progress (or was stopped).</p>'
    rows = []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            rows += [(f"{key} {sub}", v) for sub, v in value.items()]
        else:
            rows.append((key, value))
    body = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table id="summary">\n{body}\n</table>'


def _architecture_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    layers = _layers(metrics)
    head = "".join(f"<th>phase {_e(_phase_label(metrics, i))}</th>" for i in range(len(metrics)))
    counts = [_chosen_counts(m) for m in metrics]
    rows = []
    for name in layers:
        cells = []
        for record, chosen in zip(metrics, counts):
            widths = record.get("widths") or {}
            text = (_e(_fmt(widths[name])) if name in widths
                    else '<span class="absent" title="not in the network in this phase">\u2013</span>')
            for morphism, per in chosen.items():
                if name in per:
                    sign, css = (_MINUS, "shrink") if _shrinks(morphism) else ("+", "grow")
                    text += (f' <span class="{css}" title="{_e(morphism)}: channels chosen at the end of this phase">'
                             f"{sign}{per[name]}</span>")
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    totals = "".join(f"<td>{_e(_fmt(sum((m.get('widths') or {}).values())))}</td>" for m in metrics)
    return (f'<table id="architecture">\n<thead><tr><th>layer</th>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows)
            + f"\n</tbody>\n<tfoot><tr><th>total channels</th>{totals}</tr></tfoot>\n</table>")


_PHASE_COLUMNS = ("epochs", "train_loss", "val_loss", "val_accuracy", "params", "flops", "seconds", "applied")


def _metrics_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    columns = [c for c in _PHASE_COLUMNS if any(c in m for m in metrics)]
    head = "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in columns)
    rows = []
    for i, m in enumerate(metrics):
        cells = []
        for c in columns:
            value = m.get(c)
            if c == "applied" and isinstance(value, Mapping):
                text = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "\u2013"
            else:
                text = _fmt(value)
            cells.append(f"<td>{_e(text)}</td>")
        rows.append(f"<tr><th>{_e(_phase_label(metrics, i))}</th>{''.join(cells)}</tr>")
    return (f'<table id="metrics">\n<thead><tr><th>phase</th>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody>\n</table>")


def _html(root: Path, metrics: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
          growth_png: bytes, metrics_png: bytes) -> str:
    model = summary.get("model") or root.resolve().name
    title = f"morphir growth report: {model}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="note">Run directory: {_e(root)}; {len(metrics)} phase{'s' * (len(metrics) != 1)} recorded.</p>
<h2>Summary</h2>
{_summary_table(summary)}
<h2>Architecture per phase</h2>
<p class="note">Channels per layer in each phase; <span class="grow">+n</span> / <span class="shrink">{_MINUS}n</span>:
channels chosen to split / prune at the end of that phase (a dash: the layer did not exist yet).</p>
{_architecture_table(metrics)}
<h2>Metrics per phase</h2>
{_img(metrics_png, "validation accuracy, losses and parameters against phase")}
{_metrics_table(metrics)}
<h2>Layer widths</h2>
{_img(growth_png, "layer widths per phase and the channels chosen to split and prune")}
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through a temporary file in its directory, then move it into place."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise MorphirError(f"cannot write {path}: {exc.strerror or exc}; check that {path.parent} exists, is "
                           "writable and has space") from None
