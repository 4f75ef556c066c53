"""What `keeplora-hf analyze` writes: analysis.json, summary.md and three plots (Agg canvas, no pyplot state).

- `intra_layer.png`: accuracy vs principal energy per eval set, principal-only and residual-only reconstruction
  (and the fine-tuned model's principal-only reconstruction when the fine-tuning probe ran);
- `depth.png`: accuracy vs depth group after resetting / perturbing one group's residual subspace, and the task gain
  vs general drop of a LoRA trained on one group only;
- `spectra.png`: every target's normalised singular values and the share of its rank each energy level keeps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from ..continual.checkpoint import atomic_write, atomic_write_json
from ..continual.report import new_figure, save_png, to_jsonable
from .eval_sets import retention

__all__ = ["PLOTS", "markdown_summary", "plot_depth", "plot_intra_layer", "plot_spectra", "write_analysis"]

PLOTS = ("intra_layer.png", "depth.png", "spectra.png")


def write_analysis(results: Mapping[str, Any], output_dir: str | Path) -> list[Path]:
    """Write analysis.json, summary.md and the plots into `output_dir`; each file appears whole or not at all."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_intra_layer(results, out / PLOTS[0]),
        plot_spectra(results, out / PLOTS[2]),
    ]
    if "inter_layer" in results:
        paths.insert(1, plot_depth(results, out / PLOTS[1]))
    summary = out / "summary.md"
    text = markdown_summary(results)
    atomic_write(summary, lambda f: f.write(text.encode()))
    payload = {k: v for k, v in results.items() if k != "files"} | {"files": [str(p) for p in [*paths, summary]]}
    atomic_write_json(out / "analysis.json", to_jsonable(payload))
    return [*paths, summary, out / "analysis.json"]


# Styling --------------------------------------------------------------------------------------------------------


def _colours(results: Mapping[str, Any]) -> dict[str, Any]:
    """General sets in blues, task sets in oranges, so the two families read apart at a glance."""
    general, tasks = results["general_sets"], results["task_sets"]
    blues, oranges = matplotlib.colormaps["Blues"], matplotlib.colormaps["Oranges"]
    colours = {n: blues(0.45 + 0.5 * i / max(len(general) - 1, 1)) for i, n in enumerate(general)}
    colours |= {n: oranges(0.4 + 0.5 * i / max(len(tasks) - 1, 1)) for i, n in enumerate(tasks)}
    return colours


def _series(measurements: Mapping[str, Any], keys: Sequence[str], name: str) -> np.ndarray:
    return np.array([100 * measurements[k]["accuracy"][name] for k in keys], dtype=float)


def _means(measurements: Mapping[str, Any], keys: Sequence[str], which: str) -> np.ndarray:
    return np.array([np.nan if measurements[k][which] is None else 100 * measurements[k][which] for k in keys])


def _draw_sets(ax, results, measurements, keys, x, *, linestyle="-") -> None:
    colours = _colours(results)
    for name in [*results["general_sets"], *results["task_sets"]]:
        ax.plot(x, _series(measurements, keys, name), linestyle=linestyle, marker=".", linewidth=1,
                color=colours[name], label=name)
    for which, colour, label in (("general_mean", "navy", "general (mean)"), ("task_mean", "darkred", "tasks (mean)")):
        values = _means(measurements, keys, which)
        if not np.all(np.isnan(values)):
            ax.plot(x, values, linestyle=linestyle, marker="o", linewidth=2.5, color=colour, label=label)


def _legend(figure, ax) -> None:
    """One legend for the eval-set lines, outside the panels on the right."""
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize="small")


# Plots ----------------------------------------------------------------------------------------------------------


def plot_intra_layer(results: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy vs principal energy: principal-only, residual-only, and the fine-tuned model's principal-only."""
    intra = results["intra_layer"]
    keys = list(intra["principal"])
    energies = [float(k) for k in keys]
    reconstruction = (results.get("finetune") or {}).get("all_groups")
    split = (reconstruction or {}).get("update_split") or {}
    panels = 2 + bool(reconstruction) + bool(split.get("residual"))
    figure = new_figure(4.6 * panels + 2.2, 4.4)
    axes = figure.subplots(1, panels, sharey=True)
    titles = ("every target W -> principal part W V_p V_p^T", "every target W -> residual part W - W V_p V_p^T")
    for ax, kind, title in zip(axes, ("principal", "residual"), titles):
        _draw_sets(ax, results, intra[kind], keys, energies)
        ax.set_title(title, fontsize="medium")
    if reconstruction:
        task = results["finetune"]["task"]
        rkeys = list(reconstruction["principal"])
        _draw_sets(axes[2], results, reconstruction["principal"], rkeys, [float(k) for k in rkeys])
        axes[2].set_title(f"after a LoRA on {task} (merged): principal part", fontsize="medium")
    if split.get("residual"):
        task = results["finetune"]["task"]
        ax = axes[3]
        for kind, style in (("residual", "-"), ("principal", "--")):
            keys = list(split[kind])
            x = [float(k) for k in keys]
            ax.plot(x, _series(split[kind], keys, task), linestyle=style, marker="o", color="darkred",
                    label=f"{task}, {kind} part of ΔW")
            ax.plot(x, _means(split[kind], keys, "general_mean"), linestyle=style, marker="o", color="navy",
                    label=f"general (mean), {kind} part of ΔW")
        tuned = reconstruction["finetuned"]
        ax.axhline(100 * tuned["accuracy"][task], color="darkred", linestyle=":", linewidth=1)
        ax.set_title(f"W + part of the {task} update ΔW\n(split by the pre-trained W's subspaces)", fontsize="medium")
        ax.legend(fontsize="x-small", loc="lower right")
    base = results["baseline"]
    for ax in axes:
        ax.axhline(100 * base["general_mean"], color="navy", linestyle=":", linewidth=1)
        if base["task_mean"] is not None:
            ax.axhline(100 * base["task_mean"], color="darkred", linestyle=":", linewidth=1)
        ax.set_xlabel("principal energy ε_w")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)  (dotted: unchanged model)")
    _legend(figure, axes[0])
    return save_png(figure, path)


def plot_depth(results: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy vs depth group (shallow -> deep) after resetting / perturbing its residual, and the LoRA probe."""
    inter = results["inter_layer"]
    groups = [g["name"] for g in results["groups"]]
    x = np.arange(len(groups))
    probe = (results.get("finetune") or {}).get("groups")
    panels = 3 if probe else 2
    figure = new_figure(4.6 * panels + 2.2, 4.6)
    axes = figure.subplots(1, panels)
    energy, reset = inter["energy"], inter.get("reset_energy", inter["energy"])
    titles = (f"one group reset to its principal part (ε={reset:g})",
              f"one group's residual perturbed (noise {inter['perturb_scale']:g}·||W||, ε_w={energy:g})")
    for ax, kind, title in zip(axes, ("reset", "perturb"), titles):
        _draw_sets(ax, results, inter[kind], groups, x)
        ax.axhline(100 * results["baseline"]["general_mean"], color="navy", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("accuracy (%)  (dotted: unchanged, general)")
        ax.set_ylim(-2, 102)
    if probe:
        task = results["finetune"]["task"]
        base = results["baseline"]
        gain = [100 * (probe[g]["accuracy"][task] - base["accuracy"][task]) for g in groups]
        drop = [100 * (base["general_mean"] - probe[g]["general_mean"]) for g in groups]
        width = 0.38
        axes[2].bar(x - width / 2, gain, width, color="darkred", label=f"{task} gain")
        axes[2].bar(x + width / 2, drop, width, color="navy", label="general drop")
        axes[2].axhline(0, color="black", linewidth=0.8)
        axes[2].set_title(f"LoRA trained on {task} in one group only", fontsize="medium")
        axes[2].set_ylabel("accuracy points")
        axes[2].legend(fontsize="small")
    for ax in axes:
        ax.set_xticks(x, labels=[_short(g) for g in groups], rotation=30, ha="right")
        ax.set_xlabel("depth group (shallow -> deep)")
        ax.grid(alpha=0.3)
    _legend(figure, axes[0])
    return save_png(figure, path)


def plot_spectra(results: Mapping[str, Any], path: str | Path) -> Path:
    """Normalised singular values per target (coloured by depth) and the rank share each energy keeps."""
    rows = results["spectra"]
    figure = new_figure(13.0, max(4.4, 1.6 + 0.16 * len(rows)))
    left, right = figure.subplots(1, 2, width_ratios=[1.0, 1.3])
    cmap = matplotlib.colormaps["viridis"]
    for row in rows:
        values = np.array(row["singular_values"], dtype=float)
        if values.size == 0 or values[0] <= 0:
            continue
        index = (np.array(row["spectrum_index"], dtype=float) + 1) / row["full_rank"]
        colour = cmap(row["depth"]) if row["depth"] is not None else "grey"
        left.plot(index, values / values[0], color=colour, linewidth=0.8, alpha=0.8)
    left.set_yscale("log")
    left.set_xlabel("singular value index / full rank")
    left.set_ylabel("σ_i / σ_1")
    left.set_title("spectra (colour: depth, purple = shallow, yellow = deep)", fontsize="medium")
    left.grid(alpha=0.3)
    energies = results["config"]["energies"]
    keys = list(rows[0]["rank_fraction"]) if rows else []
    grid = np.array([[row["rank_fraction"][k] for k in keys] for row in rows]) * 100
    image = right.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(grid):
        if len(rows) <= 40:
            right.text(j, i, f"{rows[i]['ranks'][keys[j]]}", ha="center", va="center", fontsize=6,
                       color="white" if value < 60 else "black")
    right.set_xticks(range(len(keys)), labels=[f"{e:g}" for e in energies])
    right.set_yticks(range(len(rows)), labels=[_short(r["name"]) for r in rows], fontsize=6 if len(rows) > 20 else 8)
    right.set_xlabel("principal energy ε_w")
    right.set_title("rank kept (numbers) and share of the full rank (colour)", fontsize="medium")
    figure.colorbar(image, ax=right, label="% of full rank")
    return save_png(figure, path)


def _short(name: str) -> str:
    """`model.language_model.layers.3.self_attn.q_proj` -> `language_model.3.q_proj`: plot labels must be short."""
    name = re.sub(r"^model\.", "", name)
    name = re.sub(r"\.layers\.(\d+)\.(self_attn|mlp)\.", r".\1.", name)
    return name.replace(".layers[", "[")


# Markdown -------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _measurement_rows(results: Mapping[str, Any], measurements: Mapping[str, Any], label: str) -> list[list[str]]:
    names = [*results["general_sets"], *results["task_sets"]]
    return [[f"{label}{key}", _pct(m["general_mean"]), _pct(m["task_mean"]), *(_pct(m["accuracy"][n]) for n in names)]
            for key, m in measurements.items()]


def markdown_summary(results: Mapping[str, Any]) -> str:
    """The recommendation with its evidence, then every measurement as a table (accuracies in %)."""
    names = [*results["general_sets"], *results["task_sets"]]
    header = ["", "general (mean)", "tasks (mean)", *names]
    base = results["baseline"]
    lines = ["# Where the model keeps its knowledge", ""]
    recommendation = results.get("recommendation")
    if recommendation:
        lines += ["## Recommendation", "", "```", recommendation["text"], "```", ""]
        claims = recommendation["claims"]
        lines += [f"- intra-layer claim (general knowledge in the principal subspace, task knowledge in the residual): "
                  f"**{'holds' if claims.get('intra_layer') else 'not shown'}**"]
        if "inter_layer" in claims:
            lines += [f"- inter-layer claim (shallow layers matter more to general skills): "
                      f"**{'holds' if claims['inter_layer'] else 'not shown'}**"]
        lines.append("")
    chance = [f"chance {_pct(results['eval_sets'][n]['chance'])}, n={results['eval_sets'][n]['size']}" for n in names]
    lines += ["## Unchanged model", ""]
    lines += _table(header, [["accuracy", _pct(base["general_mean"]), _pct(base["task_mean"]),
                              *(_pct(base["accuracy"][n]) for n in names)], ["", "", "", *chance]])
    lines += ["", "## Intra-layer: every target weight replaced by its principal / residual part", ""]
    rows = _measurement_rows(results, results["intra_layer"]["principal"], "principal ε=")
    rows += _measurement_rows(results, results["intra_layer"]["residual"], "residual ε=")
    lines += _table(header, rows)
    lines += ["", "Share of each set's accuracy above chance that the principal part keeps (– : the unchanged model is "
              "not clearly above chance on it):", ""]
    lines += _table(["", *names], _retention_rows(results, results["intra_layer"]["principal"], base["accuracy"]))
    share = results.get("input_share")
    if share:
        levels = list(next(iter(share.values()))["mean"])
        lines += ["", "Where each set's inputs lie: share of the target layers' input energy inside the principal subspace "
                  "(mean over targets). KeepLoRA updates act only on the rest; the principal subspace shields general "
                  "knowledge only if general inputs lie in it more than task inputs do:", ""]
        lines += _table(["", *(f"ε={e}" for e in levels)],
                        [[n, *(_pct(share[n]["mean"][e]) for e in levels)] for n in names if n in share])
    probe = results.get("finetune")
    if probe and probe.get("all_groups"):
        recon = probe["all_groups"]
        lines += ["", f"## Fine-tuned on {probe['task']} (LoRA on every target, merged), then principal-only", ""]
        rows = [["fine-tuned", _pct(recon["finetuned"]["general_mean"]), _pct(recon["finetuned"]["task_mean"]),
                 *(_pct(recon["finetuned"]["accuracy"][n]) for n in names)]]
        lines += _table(header, rows + _measurement_rows(results, recon["principal"], "principal ε="))
        lines += ["", "Share above chance kept, relative to the fine-tuned model:", ""]
        lines += _table(["", *names], _retention_rows(results, recon["principal"], recon["finetuned"]["accuracy"]))
        split = recon.get("update_split") or {}
        if split.get("residual"):
            lines += ["", f"The {probe['task']} update ΔW split along the pre-trained weights' subspaces: W + ΔW(I − V_pV_pᵀ) "
                      "(residual part, what KeepLoRA allows) and W + ΔW V_pV_pᵀ (principal part, what it forbids):", ""]
            rows = _measurement_rows(results, split["residual"], "residual part ε=")
            rows += _measurement_rows(results, split["principal"], "principal part ε=")
            lines += _table(header, rows)
    if "inter_layer" in results:
        inter = results["inter_layer"]
        reset = inter.get("reset_energy", inter["energy"])
        lines += ["", "## Inter-layer: one depth group at a time", "",
                  f"reset: the group's weights replaced by their principal part at ε = {reset:g}; perturb: Gaussian "
                  f"noise of norm {inter['perturb_scale']:g}·‖W‖_F in the residual subspace of ε_w = {inter['energy']:g}.",
                  ""]
        rows = _measurement_rows(results, inter["reset"], f"reset ε={reset:g} ")
        rows += _measurement_rows(results, inter["perturb"], f"perturb ×{inter['perturb_scale']:g} ")
        lines += _table(header, rows)
        if inter.get("calibration"):
            lines += ["", "Noise scale calibration (every target perturbed at once; the first scale keeping ≤ 75 % of "
                      "the general knowledge above chance is used per group):", ""]
            lines += _table(header, _measurement_rows(results, inter["calibration"], "all targets ×"))
    if probe and probe.get("groups"):
        lines += ["", f"## LoRA (r={results['config']['finetune']['rank']}, {results['config']['finetune']['steps']} "
                  f"steps) on {probe['task']}, one group only", ""]
        lines += _table(header, _measurement_rows(results, probe["groups"], ""))
    lines += ["", "## Rank kept per energy (mean over targets of each kind)", ""]
    lines += _rank_table(results)
    lines += ["", f"Timings (s): {results.get('timings_s', {})}", ""]
    return "\n".join(lines)


def _retention_rows(results: Mapping[str, Any], measurements: Mapping[str, Any], reference: Mapping[str, float]) -> list[list[str]]:
    names = [*results["general_sets"], *results["task_sets"]]
    chance = {n: results["eval_sets"][n]["chance"] for n in names}
    return [[f"ε={key}", *(_pct(retention(m["accuracy"][n], reference[n], chance[n])) for n in names)]
            for key, m in measurements.items()]


def _rank_table(results: Mapping[str, Any]) -> list[str]:
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for row in results["spectra"]:
        kinds.setdefault(row["name"].rsplit(".", 1)[-1], []).append(row)
    keys = list(results["spectra"][0]["ranks"]) if results["spectra"] else []
    rows = []
    for kind, members in kinds.items():
        full = members[0]["full_rank"]
        cells = [f"{np.mean([m['ranks'][k] for m in members]):.1f}" for k in keys]
        rows.append([f"{kind} ({len(members)}, rank ≤ {full})", *cells])
    return _table(["target", *(f"ε={k}" for k in keys)], rows)
