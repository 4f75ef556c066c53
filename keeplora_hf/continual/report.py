"""What a person reads after a continual run: results.json, heatmaps, accuracy curves, report.md, a terminal table.

Every entry of `results["methods"]` holds an `accuracy_matrix` of shape (T+1, T) in fractions (null/NaN = not
evaluated), optionally `general` (one value per matrix row for each held-out set), `metrics` and `timings_s`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure
from .metrics import METRIC_NAMES, as_accuracy_matrix, check_general, compute_all

RESULTS_FILE = "results.json"
MISSING = "–"  # markdown: not evaluated / undefined
TERMINAL_MISSING = "-"  # ASCII, so printing never fails on a non-UTF-8 console at the end of a long run
METRIC_HELP = {
    "transfer": "ZSCL: accuracy on a task before learning it (rows after earlier tasks)",
    "avg": "ZSCL: mean of every cell after each task",
    "last": "ZSCL: final model on every task",
    "mft": "mean accuracy on each task right after learning it",
    "mfn": "mean final accuracy (= last)",
    "maa": "mean, over steps, of the accuracy on the tasks seen so far",
    "bwt": "backward transfer: final minus just-learned accuracy (negative = forgetting)",
    "fwt": "forward transfer: accuracy before learning a task minus zero-shot",
    "forgetting": "Chaudhry: best earlier accuracy minus final accuracy",
    "general_retention": "held-out general sets: final / zero-shot accuracy",
}


def row_labels(tasks: Sequence[str]) -> list[str]:
    """Names the matrix rows by what the model had learned, which is how readers index them."""
    return ["zero-shot", *(f"after {task}" for task in tasks)]


def plot_names(method: str) -> tuple[str, str]:
    """File names of a method's heatmap and curve plot; method names may hold characters unfit for a file name."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", method)
    return f"heatmap_{slug}.png", f"accuracy_over_time_{slug}.png"


def to_jsonable(value: Any) -> Any:
    """Strict JSON has no NaN: non-finite floats become null and numpy values plain Python."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _checked(matrix: Any, tasks: Sequence[str]) -> np.ndarray:
    R = as_accuracy_matrix(matrix)
    if len(tasks) != R.shape[1]:
        raise ValueError(f"{len(tasks)} task names for an accuracy matrix of {R.shape[1]} tasks")
    return R


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas: no display needed and pyplot's global backend left alone (matplotlib loads here,
    when a plot is made, not with the package)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def colormap(name: str):
    """A matplotlib colormap by name."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_png(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))
    return path


def save_heatmap(matrix: Any, tasks: Sequence[str], path: str | Path, title: str) -> Path:
    """Accuracy-matrix heatmap in %; not-evaluated cells are grey and unlabelled."""
    R = _checked(matrix, tasks)
    T = len(tasks)
    figure = new_figure(max(4.5, 1.8 + 0.8 * T), max(3.0, 1.2 + 0.45 * (T + 1)))
    ax = figure.add_subplot()
    cmap = colormap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(R * 100), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    fontsize = 9 if T <= 8 else 7
    for (row, column), value in np.ndenumerate(R):
        if not math.isnan(value):
            colour = "white" if value < 0.6 else "black"  # contrast against viridis' dark low end
            ax.text(column, row, f"{100 * value:.1f}", ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_xticks(range(T), labels=tasks, rotation=45 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T + 1), labels=row_labels(tasks))
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="accuracy (%)")
    return save_png(figure, path)


def save_accuracy_over_time(
    matrix: Any,
    tasks: Sequence[str],
    path: str | Path,
    general: Mapping[str, Sequence[float | None]] | None = None,
) -> Path:
    """Each task's accuracy across the sequence (rise when learned, fall when forgotten); general sets dashed."""
    R = _checked(matrix, tasks)
    general = general or {}
    check_general(general, R.shape[0])
    steps = np.arange(R.shape[0])
    colours = colormap("tab10" if len(tasks) + len(general) <= 10 else "tab20")
    figure = new_figure(max(6.0, 2.5 + 0.7 * len(steps)), 4.5)
    ax = figure.add_subplot()
    for column, task in enumerate(tasks):
        ax.plot(steps, R[:, column] * 100, marker="o", color=colours(column % colours.N), label=task)
    for offset, (name, values) in enumerate(general.items(), start=len(tasks)):
        curve = np.array(values, dtype=float) * 100
        ax.plot(steps, curve, linestyle="--", marker="s", color=colours(offset % colours.N), label=f"{name} (general)")
    ax.set_xticks(steps, labels=row_labels(tasks), rotation=45 if len(tasks) > 4 else 0,
                  ha="right" if len(tasks) > 4 else "center")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_png(figure, path)


def format_percent(value: float | None, missing: str = MISSING) -> str:
    return missing if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _metrics_of(entry: Mapping[str, Any]) -> dict[str, float | None]:
    """Stored metrics when the run recorded them; computed for hand-entered baselines that carry only a matrix."""
    return dict(entry.get("metrics") or compute_all(entry["accuracy_matrix"], entry.get("general") or None))


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)
) -> list[str]:
    """Numbers right-aligned so decimals line up; `text_columns` left-aligned."""
    rule = ["---" if i in text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def matrix_rows(
    R: np.ndarray, tasks: Sequence[str], general: Mapping[str, Sequence[float | None]], missing: str
) -> tuple[list[str], list[list[str]]]:
    """Matrix rows with the general sets as extra columns, since both are indexed by the same rows."""
    check_general(general, R.shape[0])
    header = ["", *tasks, *(f"general:{name}" for name in general)]
    rows = []
    for index, label in enumerate(row_labels(tasks)):
        values = [*R[index], *(general[name][index] for name in general)]
        rows.append([label, *(format_percent(v, missing) for v in values)])
    return header, rows


def markdown_report(results: Mapping[str, Any]) -> str:
    """Per method its matrix and metrics, then all methods side by side."""
    tasks = list(results["tasks"])
    methods = results["methods"]
    lines = [
        "# Continual-learning report",
        "",
        f"Tasks, in training order: {', '.join(tasks)}. Accuracies and metrics in %; {MISSING} = not evaluated "
        "or undefined.",
    ]
    if "seed" in results or results.get("versions"):
        versions = ", ".join(f"{name} {version}" for name, version in (results.get("versions") or {}).items())
        lines += ["", f"Seed: {results.get('seed', MISSING)}." + (f" Versions: {versions}." if versions else "")]
    comparison = []
    for method, entry in methods.items():
        R = _checked(entry["accuracy_matrix"], tasks)
        general = entry.get("general") or {}
        metrics = _metrics_of(entry)
        heatmap, curve = plot_names(method)
        header, rows = matrix_rows(R, tasks, general, MISSING)
        lines += ["", f"## {method}", "", "### Accuracy matrix", "", *markdown_table(header, rows), ""]
        lines += [f"![{method} accuracy matrix]({heatmap})", "", f"![{method} accuracy over time]({curve})", ""]
        lines += ["### Metrics", ""]
        rows = [[name, format_percent(metrics.get(name)), METRIC_HELP[name]] for name in METRIC_NAMES]
        lines += markdown_table(["metric", "value", "meaning"], rows, text_columns=(0, 2))
        timings = entry.get("timings_s") or {}
        if timings:
            spent = ", ".join(f"{key.replace('_', ' ')} {value:.1f}" for key, value in timings.items())
            lines += ["", f"Time (s): {spent}"]
        comparison.append([method, *(format_percent(metrics.get(n)) for n in METRIC_NAMES)])
    lines += ["", "## Comparison", "", *markdown_table(["method", *METRIC_NAMES], comparison), ""]
    return "\n".join(lines)


def _fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers, so decimals line up."""
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)).rstrip()
        for line in [header, *rows]
    ]


def terminal_summary(results: Mapping[str, Any]) -> str:
    """Metrics with one column per method (stays narrow for many metrics), then each method's matrix."""
    tasks = list(results["tasks"])
    methods = results["methods"]
    metrics = {method: _metrics_of(entry) for method, entry in methods.items()}
    lines = [f"Continual-learning metrics (%, {TERMINAL_MISSING} = undefined)"]
    lines += _fixed_width(
        ["metric", *methods],
        [[name, *(format_percent(metrics[m].get(name), TERMINAL_MISSING) for m in methods)] for name in METRIC_NAMES],
    )
    for method, entry in methods.items():
        R = _checked(entry["accuracy_matrix"], tasks)
        header, rows = matrix_rows(R, tasks, entry.get("general") or {}, TERMINAL_MISSING)
        lines += ["", f"{method}: accuracy matrix (%)", *_fixed_width(header, rows)]
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """results.json, two plots per method and report.md, each written atomically; returns the paths written."""
    out = Path(out_dir)
    methods = results["methods"]
    names = [plot_names(method) for method in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names {list(methods)} map to the same plot file names; rename one")
    markdown = markdown_report(results)  # validates every method before anything is written
    payload = json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n"
    written = [out / RESULTS_FILE]
    atomic_write(written[0], lambda f: f.write(payload.encode()))
    tasks = list(results["tasks"])
    for (method, entry), (heatmap, curve) in zip(methods.items(), names):
        written.append(save_heatmap(entry["accuracy_matrix"], tasks, out / heatmap, f"{method}: accuracy (%)"))
        written.append(save_accuracy_over_time(entry["accuracy_matrix"], tasks, out / curve, entry.get("general")))
    written.append(out / "report.md")
    atomic_write(written[-1], lambda f: f.write(markdown.encode()))
    return written
