"""The measurements of an analysis and `analyze`, which runs them all on a model and leaves it as it came in."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..subspace.principal import COMPUTE_DTYPE
from ..tuner.depth import stack_position
from .depth import DepthGroup, depth_groups, relative_depth, target_linears
from .eval_sets import (
    MIN_KNOWLEDGE,
    EvalSet,
    as_eval_set,
    chance_mean,
    energy_key,
    evaluate,
    mean,
    measurement,
    retention,
)
from .interventions import (
    LayerSpectrum,
    WeightSnapshot,
    perturb_residual,
    principal_only,
    residual_only,
    target_spectra,
)
from .probe import FinetuneSpec, remove_lora, train_lora, training_batches
from .recommend import GAMMA_RANGE, GENERAL_KEEP, TASK_FALL_MARGIN, recommend, recommend_eps_w
from .report import write_analysis

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_KEEP", "DEFAULT_ENERGIES", "PERTURB_LADDER", "analyze", "calibrate_perturbation"]

DEFAULT_ENERGIES = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0)
# residual noise scales (x ||W||_F) tried, all targets at once, to calibrate the per-group perturbation ...
PERTURB_LADDER = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# ... the first that leaves at most this share of the general knowledge above chance is used
CALIBRATION_KEEP = 0.75
_SPECTRUM_POINTS = 256


@dataclass
class _Context:
    model: nn.Module
    eval_sets: dict[str, EvalSet]
    general: list[str]
    tasks: list[str]
    snapshot: WeightSnapshot
    spectra: dict[str, LayerSpectrum]
    names: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    baseline_general: float | None = None

    def measure(self) -> dict[str, Any]:
        return measurement(evaluate(self.model, self.eval_sets), self.general, self.tasks)


def analyze(
    model: nn.Module,
    eval_sets: Mapping[str, EvalSet | tuple],
    targets: str | Sequence[str],
    *,
    general: Sequence[str] | None = None,
    energies: Sequence[float] = DEFAULT_ENERGIES,
    groups: int | Mapping[str, str | Sequence[str]] | None = None,
    inter_energy: float | str = "auto",
    perturb_scale: float | str = "auto",
    reset_energy: float | str = "auto",
    finetune: FinetuneSpec | Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure where `model` keeps the knowledge that `eval_sets` test; returns (and writes) the results.

    `eval_sets`: name -> `EvalSet` or `(dataset, metric[, chance])`, two or more. `general` names the sets that
    measure general knowledge (default: the names starting with "general"); the others are task-specific.
    `targets`: the weights to analyse, a regex (fullmatch) or a list of module names, as for peft.
    `energies`: the principal-energy levels of the intra-layer measurement. `groups`: the depth groups of the
    inter-layer one (see `depth_groups`). `inter_energy`: the ε_w whose residual subspace is perturbed there;
    "auto" takes the recommended ε_w. `perturb_scale`: the residual noise's norm relative to `||W||_F`; "auto"
    calibrates it (`calibrate_perturbation`). `reset_energy`: the energy a group's weights are reset to (their
    principal part); "auto": the largest tested energy below `inter_energy` whose reconstruction of every target
    at once loses general knowledge (keeps < 90 %), so a per-group reset shows where that knowledge sits.
    `finetune`: a `FinetuneSpec` (or its fields as a dict) for the fine-tuning probe, None to skip it.
    `output_dir`: where to write analysis.json, summary.md and the plots (nothing written when None).

    The model's target weights (and every other parameter, its `requires_grad` flags and train/eval mode) are the
    same, bit for bit, when this returns or raises.
    """
    sets = {name: as_eval_set(value) for name, value in eval_sets.items()}
    if len(sets) < 2:
        raise ValueError("analyze needs two or more eval sets, e.g. a general one and a task-specific one")
    general_names = [n for n in sets if n.startswith("general")] if general is None else list(general)
    unknown = [n for n in general_names if n not in sets]
    if unknown:
        raise ValueError(f"general sets {unknown} are not among the eval sets {list(sets)}")
    if not general_names:
        raise ValueError("no general eval set: name one with general=[...] or give it a name starting with 'general'")
    task_names = [n for n in sets if n not in general_names]
    energies = sorted({float(e) for e in energies})
    if not energies or any(not 0.0 <= e <= 1.0 for e in energies):
        raise ValueError(f"energies must be in [0, 1], got {energies}")
    spec = FinetuneSpec(**finetune) if isinstance(finetune, Mapping) else finetune
    if spec is not None and spec.task not in sets:
        raise ValueError(f"finetune task {spec.task!r} is not an eval set; choose from {list(sets)}")

    modules = target_linears(model, targets)
    names = list(modules)
    training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    start = time.perf_counter()
    snapshot = WeightSnapshot(modules)
    spectra = target_spectra(snapshot)
    ctx = _Context(model, sets, general_names, task_names, snapshot, spectra, names)
    ctx.timings["svd"] = time.perf_counter() - start
    group_list = depth_groups(model, names, groups)
    chances = {n: s.chance for n, s in sets.items()}

    results: dict[str, Any] = {
        "config": {
            "targets": targets if isinstance(targets, str) else list(targets),
            "energies": energies,
            "groups": [g.name for g in group_list],
            "perturb_scale": perturb_scale,
            "inter_energy": inter_energy,
            "reset_energy": reset_energy,
            "finetune": spec.settings() if spec else None,
            "seed": seed,
            "rules": {"general_keep": GENERAL_KEEP, "task_fall_margin": TASK_FALL_MARGIN,
                      "gamma_range": list(GAMMA_RANGE), "min_knowledge": MIN_KNOWLEDGE},
        },
        "eval_sets": {n: {"chance": s.chance, "size": s.samples(), "general": n in general_names} for n, s in sets.items()},
        "general_sets": general_names,
        "task_sets": task_names,
    }
    try:
        results["baseline"] = _timed(ctx, "baseline", ctx.measure)
        ctx.baseline_general = results["baseline"]["general_mean"]
        results["spectra"] = _spectra_summary(model, spectra, energies)
        results["groups"] = [g.as_dict() for g in group_list]
        results["intra_layer"] = _timed(ctx, "intra_layer", lambda: _intra_layer(ctx, energies))
        results["input_share"] = _timed(ctx, "input_share", lambda: _input_share(ctx, energies))
        if spec is not None:
            results["finetune"] = _timed(ctx, "finetune", lambda: _finetune_probe(ctx, group_list, spec, energies, flags))
        eps_w = recommend_eps_w(results, chances)
        chosen = eps_w["value"] if inter_energy == "auto" else float(inter_energy)
        reset = _reset_energy(eps_w["general_retention"], chosen) if reset_energy == "auto" else float(reset_energy)
        results["inter_layer"] = _timed(
            ctx, "inter_layer", lambda: _inter_layer(ctx, group_list, chosen, reset, perturb_scale, seed, chances)
        )
        results["recommendation"] = recommend(results, chances)
    finally:
        snapshot.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(training)
    if not snapshot.identical():  # pragma: no cover - restore() copies the saved bits back
        raise RuntimeError("the target weights were not restored exactly")
    results["timings_s"] = {k: round(v, 2) for k, v in ctx.timings.items()} | {"total": round(time.perf_counter() - start, 2)}
    if output_dir is not None:
        results["files"] = [str(p) for p in write_analysis(results, output_dir)]
    return results


def _timed(ctx: _Context, name: str, step: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = step()
    ctx.timings[name] = time.perf_counter() - start
    logger.info("analysis: %s done in %.1f s", name, ctx.timings[name])
    return value


def _intra_layer(ctx: _Context, energies: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"principal": {}, "residual": {}}
    for energy in energies:
        for kind, intervene in (("principal", principal_only), ("residual", residual_only)):
            with ctx.snapshot.intervention():
                intervene(ctx.snapshot, ctx.spectra, ctx.names, energy)
                out[kind][energy_key(energy)] = ctx.measure()
    return out


def _input_share(ctx: _Context, energies: Sequence[float]) -> dict[str, Any]:
    """Per eval set, the share of each target's input energy inside its principal subspace: `‖x V_p‖² / ‖x‖²`.

    A KeepLoRA update acts only on the residual part of a layer's input, `x (I − V_p V_pᵀ)`. So the principal
    subspace shields general knowledge only where general inputs lie in it and task inputs do not; the weight-side
    reconstruction (`_intra_layer`) cannot show that, this input-side measurement does. One evaluation per set.
    """
    levels = [e for e in energies if 0.0 < e < 1.0]
    out: dict[str, Any] = {}
    for set_name, eval_set in ctx.eval_sets.items():
        along = {n: torch.zeros(len(ctx.spectra[n].singular), dtype=COMPUTE_DTYPE) for n in ctx.names}
        total = dict.fromkeys(ctx.names, 0.0)

        def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                coordinates = x.float() @ ctx.spectra[name].vh.to(x.device).T
                along[name] += coordinates.to(COMPUTE_DTYPE).square().sum(0).cpu()
                total[name] += float(x.to(COMPUTE_DTYPE).square().sum())

            return hook

        handles = [ctx.snapshot.modules[n].register_forward_pre_hook(recorder(n)) for n in ctx.names]
        try:
            evaluate(ctx.model, {set_name: eval_set})
        finally:
            for handle in handles:
                handle.remove()
        layers = {
            n: {energy_key(e): float(along[n][: ctx.spectra[n].rank(e)].sum()) / total[n] for e in levels}
            for n in ctx.names
            if total[n] > 0
        }
        out[set_name] = {"mean": {energy_key(e): mean([v[energy_key(e)] for v in layers.values()]) for e in levels}, "layers": layers}
    return out


def _reset_energy(general_retention: Mapping[str, float | None], below: float) -> float:
    """The largest tested energy under `below` whose whole-model principal-only reconstruction keeps < 90 % of the
    general knowledge; the smallest tested energy when every one keeps more."""
    losing = [float(e) for e, r in general_retention.items() if float(e) < below and r is not None and r < GENERAL_KEEP]
    if losing:
        return max(losing)
    return min(float(e) for e in general_retention)


def calibrate_perturbation(
    ctx: _Context, energy: float, seed: int, chances: Mapping[str, float]
) -> tuple[float, dict[str, Any]]:
    """The residual noise scale for the per-group measurement, from the data.

    Noise in the residual subspace of *every* target at once, at scales PERTURB_LADDER (relative to `||W||_F`);
    the first scale that removes at least a quarter of the general knowledge above chance (retention <= 75 %) is
    used per group, so each group's share of that loss is measurable. Without such a scale, the largest.
    """
    ladder: dict[str, Any] = {}
    chance = chance_mean(chances, ctx.general)
    for scale in PERTURB_LADDER:
        with ctx.snapshot.intervention():
            perturb_residual(ctx.snapshot, ctx.spectra, ctx.names, energy, scale, seed * 1000 + 999)
            ladder[energy_key(scale)] = ctx.measure()
        kept = retention(ladder[energy_key(scale)]["general_mean"], ctx.baseline_general, chance)
        if kept is not None and kept <= CALIBRATION_KEEP:
            return scale, ladder
    return PERTURB_LADDER[-1], ladder


def _inter_layer(
    ctx: _Context,
    group_list: Sequence[DepthGroup],
    energy: float,
    reset_energy: float,
    scale: float | str,
    seed: int,
    chances: Mapping[str, float],
) -> dict[str, Any]:
    calibration = None
    if scale == "auto":
        scale, calibration = calibrate_perturbation(ctx, energy, seed, chances)
    out: dict[str, Any] = {"energy": energy, "reset_energy": reset_energy, "perturb_scale": float(scale),
                           "calibration": calibration, "reset": {}, "perturb": {}}
    for index, group in enumerate(group_list):
        with ctx.snapshot.intervention():
            principal_only(ctx.snapshot, ctx.spectra, group.targets, reset_energy)
            out["reset"][group.name] = ctx.measure()
        with ctx.snapshot.intervention():
            perturb_residual(ctx.snapshot, ctx.spectra, group.targets, energy, scale, seed * 1000 + index)
            out["perturb"][group.name] = ctx.measure()
    return out


def _finetune_probe(
    ctx: _Context, group_list: Sequence[DepthGroup], spec: FinetuneSpec, energies: Sequence[float], flags: Mapping[str, bool]
) -> dict[str, Any]:
    batches = training_batches(spec)
    out: dict[str, Any] = {"task": spec.task, "groups": {}}
    for group in group_list:
        with ctx.snapshot.intervention():
            peft_model = train_lora(ctx.model, group.targets, spec, batches, merge=False)
            try:
                out["groups"][group.name] = measurement(evaluate(peft_model, ctx.eval_sets), ctx.general, ctx.tasks)
            finally:
                remove_lora(peft_model)
                _restore_flags(ctx.model, flags)
    if spec.reconstruct:
        with ctx.snapshot.intervention():
            try:
                train_lora(ctx.model, ctx.names, spec, batches, merge=True)
            finally:
                _restore_flags(ctx.model, flags)
            tuned = {n: m.weight.detach().clone() for n, m in ctx.snapshot.modules.items()}
            tuned_spectra = {n: LayerSpectrum.of(w) for n, w in tuned.items()}
            reconstruction: dict[str, Any] = {"finetuned": ctx.measure(), "principal": {}}
            for energy in energies:
                for name in ctx.names:
                    ctx.snapshot.set(name, tuned_spectra[name].principal_part(tuned[name], energy))
                reconstruction["principal"][energy_key(energy)] = ctx.measure()
            reconstruction["update_split"] = _update_split(ctx, tuned, energies)
            out["all_groups"] = reconstruction
    return out


def _update_split(ctx: _Context, tuned: Mapping[str, torch.Tensor], energies: Sequence[float]) -> dict[str, Any]:
    """The fine-tuning update `ΔW = W_tuned - W` split along the *pre-trained* weight's subspaces at each energy.

    "residual": `W + ΔW (I - V_p V_pᵀ)`, the part of the update a KeepLoRA update may contain; "principal":
    `W + ΔW V_p V_pᵀ`, the part it forbids. Does the learned task live in the first, and general damage in the second?
    """
    split: dict[str, Any] = {"residual": {}, "principal": {}}
    for energy in [e for e in energies if 0.0 < e < 1.0]:
        for kind in split:
            for name in ctx.names:
                original = ctx.snapshot.original[name].to(tuned[name].device, COMPUTE_DTYPE)
                delta = tuned[name].to(COMPUTE_DTYPE) - original
                along = ctx.spectra[name].principal_part(delta, energy)
                ctx.snapshot.set(name, original + (delta - along if kind == "residual" else along))
            split[kind][energy_key(energy)] = ctx.measure()
    return split


def _restore_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _spectra_summary(model: nn.Module, spectra: Mapping[str, LayerSpectrum], energies: Sequence[float]) -> list[dict[str, Any]]:
    rows = []
    for name, spectrum in spectra.items():
        position = stack_position(model, name)
        values = spectrum.singular
        k = len(values)
        if k > _SPECTRUM_POINTS:
            index = torch.unique(torch.logspace(0, math.log10(k), _SPECTRUM_POINTS).round().long() - 1).tolist()
        else:
            index = list(range(k))
        rows.append({
            "name": name,
            "shape": list(spectrum.shape),
            "stack": position[0] if position else "",
            "layer": position[1] if position else None,
            "depth": relative_depth(position[1], position[2]) if position else None,
            "full_rank": k,
            "ranks": {energy_key(e): spectrum.rank(e) for e in energies},
            "rank_fraction": {energy_key(e): spectrum.rank(e) / k for e in energies},
            "spectrum_index": index,
            "singular_values": [float(values[i]) for i in index],
        })
    return rows
