"""The recommendation: ε_w and γ from an analysis' measurements, by explicit rules printed with their evidence."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .eval_sets import MIN_KNOWLEDGE, aggregate, chance_mean, energy_key, retention

__all__ = [
    "DEFAULT_EPS_W",
    "DEFAULT_GAMMA",
    "GAMMA_RANGE",
    "GENERAL_KEEP",
    "TASK_FALL_MARGIN",
    "recommend",
    "recommend_eps_w",
    "recommend_gamma",
]

# ε_w rule: the principal part must keep this share of the general accuracy above chance ...
GENERAL_KEEP = 0.9
# ... while the task-specific accuracy "falls": its retention is at least this much below the general one
TASK_FALL_MARGIN = 0.1
# γ is clipped to this range and rounded to this step
GAMMA_RANGE = (0.1, 1.0)
GAMMA_STEP = 0.05
# the method's defaults, used when the data cannot decide
DEFAULT_EPS_W = 0.6
DEFAULT_GAMMA = 0.2


def _standard_error(results: Mapping[str, Any], names: Sequence[str]) -> float:
    """Standard error of the mean accuracy over `names` at the baseline (binomial, sets independent)."""
    base = results["baseline"]["accuracy"]
    sets = results["eval_sets"]
    terms = [base[n] * (1 - base[n]) / sets[n]["size"] for n in names if sets[n]["size"]]
    return math.sqrt(sum(terms)) / len(terms) if terms else 0.0



def _informative(results: Mapping[str, Any], chances: Mapping[str, float], names: Sequence[str]) -> list[str]:
    """Sets whose baseline accuracy is clearly above chance: the ones with knowledge to lose."""
    base = results["baseline"]["accuracy"]
    keep = []
    for n in names:
        size = results["eval_sets"][n]["size"] or 1
        se = math.sqrt(max(base[n] * (1 - base[n]), 1e-12) / size)
        if base[n] - chances.get(n, 0.0) >= max(MIN_KNOWLEDGE, 2 * se):
            keep.append(n)
    return keep


def _curve(measurements: Mapping[str, Any], reference: Mapping[str, float], names: Sequence[str], chances: Mapping[str, float]) -> dict[str, float | None]:
    """Retention above chance of the mean over `names`, per energy."""
    if not names:
        return {}
    base = aggregate(reference, names)
    chance = chance_mean(chances, names)
    return {e: retention(aggregate(m["accuracy"], names), base, chance) for e, m in measurements.items()}


def recommend_eps_w(results: Mapping[str, Any], chances: Mapping[str, float]) -> dict[str, Any]:
    """ε_w from the intra-layer measurement.

    Retention = share of accuracy above chance that principal-only reconstruction keeps. Candidates: energies
    below 1 where the general sets keep >= GENERAL_KEEP (90 %). Task accuracy "falls" at an energy when the task
    retention is at least TASK_FALL_MARGIN below the general retention of the same model, where the tasks are the
    fine-tuned task when the fine-tuning probe reconstructed (the knowledge a new task adds), else the task sets
    the model already knows (above chance). ε_w = the largest candidate at which task accuracy falls: the most
    protection that still leaves the task-specific knowledge outside the protected subspace. If task accuracy
    falls at no candidate (or there is no task evidence), the smallest candidate (general knowledge fits there,
    more protection is not supported by the data). If no energy below 1 keeps 90 %, the general knowledge is not
    concentrated in a principal subspace: the method's default 0.6 with a warning.
    """
    intra = results["intra_layer"]["principal"]
    general = results["general_sets"]
    base = results["baseline"]["accuracy"]
    general_curve = _curve(intra, base, general, chances)
    candidates = [e for e, r in general_curve.items() if float(e) < 1.0 and r is not None and r >= GENERAL_KEEP]

    reconstruction = (results.get("finetune") or {}).get("all_groups")
    if reconstruction is not None:
        task = results["finetune"]["task"]
        tuned = reconstruction["finetuned"]["accuracy"]
        task_source = f"the model fine-tuned on {task} (all groups), reconstructed from its own principal parts"
        task_curve = _curve(reconstruction["principal"], tuned, [task], chances)
        same_model_general = _curve(reconstruction["principal"], tuned, general, chances)
        task_sets = [task]
    else:
        task_sets = _informative(results, chances, results["task_sets"])
        task_source = f"the task sets the model knows above chance: {task_sets}" if task_sets else "none"
        task_curve = _curve(intra, base, task_sets, chances)
        same_model_general = general_curve

    def falls(e: str) -> bool:
        t, g = task_curve.get(e), same_model_general.get(e)
        return t is not None and g is not None and t <= g - TASK_FALL_MARGIN

    falling = [e for e in candidates if falls(e)]
    if not candidates:
        below = [e for e in general_curve if float(e) < 1.0]
        value, rule = DEFAULT_EPS_W, (
            f"no energy below 1 keeps {GENERAL_KEEP:.0%} of the general accuracy above chance "
            f"(best: {_fmt_curve(general_curve, below)}): general knowledge is not concentrated in a principal "
            f"subspace of this model at the tested energies; keeping the default {DEFAULT_EPS_W}"
        )
        holds = False
    elif falling:
        value = max(float(e) for e in falling)
        rule = (f"largest energy whose principal part keeps >= {GENERAL_KEEP:.0%} of the general accuracy above "
                f"chance while the task retention is >= {TASK_FALL_MARGIN:.0%} lower")
        holds = True
    else:
        value = min(float(e) for e in candidates)
        why = "no task evidence" if not task_curve else "task accuracy does not fall more than the general one at any candidate"
        rule = (f"smallest energy whose principal part keeps >= {GENERAL_KEEP:.0%} of the general accuracy above "
                f"chance ({why})")
        holds = False
    key = energy_key(value)
    return {
        "value": value,
        "rule": rule,
        "claim_holds": holds,
        "candidates": [float(e) for e in candidates],
        "general_retention": general_curve,
        "task_source": task_source,
        "task_sets": task_sets,
        "task_retention": task_curve,
        "general_retention_same_model": same_model_general,
        "at_value": {"general_retention": general_curve.get(key), "task_retention": task_curve.get(key)},
    }


def _fit(depths: Sequence[float], drops: Sequence[float]) -> tuple[float, float]:
    """Least squares line `drop = a + b * depth`; (drop at depth 0, drop at depth 1)."""
    n = len(depths)
    mean_d, mean_y = sum(depths) / n, sum(drops) / n
    var = sum((d - mean_d) ** 2 for d in depths)
    slope = sum((d - mean_d) * (y - mean_y) for d, y in zip(depths, drops)) / var if var > 0 else 0.0
    intercept = mean_y - slope * mean_d
    return intercept, intercept + slope


def recommend_gamma(results: Mapping[str, Any]) -> dict[str, Any]:
    """γ from the inter-layer measurement.

    The general accuracy drop when one group's residual subspace is perturbed, `D(depth)`, is fitted by a line over
    the groups' depths (0 = first layer, 1 = last layer of a stack). KeepLoRA++ scales updates by `s(0) = γ` at the
    first layer and `s(1) = 1` at the last; γ = `D(1) / D(0)` makes the expected general damage `s · D` the same at
    both ends (clipped to [0.1, 1], rounded to 0.05). γ = 1 when deep layers are at least as sensitive. When no
    group's drop exceeds two standard errors of the general accuracy, the data cannot decide: the default 0.2.
    """
    inter = results["inter_layer"]
    general = results["general_sets"]
    base = results["baseline"]["general_mean"]
    groups = [g for g in results["groups"] if g["depth"] is not None and g["name"] in inter["perturb"]]
    se = _standard_error(results, general)
    threshold = 2 * se
    drops = {g["name"]: base - inter["perturb"][g["name"]]["general_mean"] for g in groups}
    reset_drops = {g["name"]: base - inter["reset"][g["name"]]["general_mean"] for g in groups}
    evidence: dict[str, Any] = {
        "perturb_scale": inter["perturb_scale"],
        "reset_energy": inter.get("reset_energy"),
        "general_drop_perturb": drops,
        "general_drop_reset": reset_drops,
        "depths": {g["name"]: g["depth"] for g in groups},
        "noise_threshold": threshold,
    }
    if len({g["depth"] for g in groups}) < 2:
        return {"value": DEFAULT_GAMMA, "rule": "fewer than two depths: the data cannot decide; default kept",
                "decided": False, **evidence}
    shallow, deep = _fit([g["depth"] for g in groups], [drops[g["name"]] for g in groups])
    reset_shallow, reset_deep = _fit([g["depth"] for g in groups], [reset_drops[g["name"]] for g in groups])
    evidence |= {"fit_drop_shallow": shallow, "fit_drop_deep": deep,
                 "fit_reset_drop_shallow": reset_shallow, "fit_reset_drop_deep": reset_deep}
    if max(drops.values()) <= threshold:
        return {"value": DEFAULT_GAMMA, "decided": False, **evidence,
                "rule": f"no group's perturbation drops the general accuracy by more than 2 standard errors "
                        f"({threshold:.1%}): the data cannot decide (raise perturb_scale); default kept"}
    if deep >= shallow or shallow <= threshold:
        return {"value": 1.0, "decided": True, **evidence,
                "rule": "deep layers are at least as sensitive as shallow ones for general skills: no depth damping"}
    raw = max(deep, 0.0) / shallow
    value = min(max(round(raw / GAMMA_STEP) * GAMMA_STEP, GAMMA_RANGE[0]), GAMMA_RANGE[1])
    return {"value": round(value, 2), "raw": raw, "decided": True, **evidence,
            "rule": "gamma = fitted general drop at the deepest / at the shallowest depth, so a scaled update costs "
                    "general skills the same at both ends"}


def _finetune_evidence(results: Mapping[str, Any]) -> dict[str, Any] | None:
    probe = results.get("finetune")
    if not probe or not probe.get("groups"):
        return None
    task = probe["task"]
    base = results["baseline"]
    rows = {}
    for group in results["groups"]:
        m = probe["groups"].get(group["name"])
        if m is None:
            continue
        rows[group["name"]] = {
            "depth": group["depth"],
            "task_gain": m["accuracy"][task] - base["accuracy"][task],
            "general_drop": base["general_mean"] - m["general_mean"],
        }
    split = (probe.get("all_groups") or {}).get("update_split")
    return {"task": task, "groups": rows, "update_split": split}


def recommend(results: Mapping[str, Any], chances: Mapping[str, float] | None = None) -> dict[str, Any]:
    """ε_w and γ with the evidence behind them, and the verdicts on the two structural claims."""
    if chances is None:
        chances = {n: s["chance"] for n, s in results["eval_sets"].items()}
    eps_w = recommend_eps_w(results, chances)
    gamma = recommend_gamma(results) if "inter_layer" in results else None
    finetune = _finetune_evidence(results)
    claims = {"intra_layer": eps_w["claim_holds"]}
    if gamma is not None and "fit_drop_shallow" in gamma:
        claims["inter_layer"] = bool(gamma["decided"] and gamma["fit_drop_shallow"] > gamma["fit_drop_deep"])
    return {"eps_w": eps_w, "gamma": gamma, "finetune": finetune, "claims": claims, "text": _text(eps_w, gamma, finetune)}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f} pts"


def _fmt_curve(curve: Mapping[str, float | None], keys: Sequence[str] | None = None) -> str:
    keys = list(curve) if keys is None else keys
    return ", ".join(f"{k}: {_pct(curve.get(k))}" for k in keys)


def _text(eps_w: Mapping[str, Any], gamma: Mapping[str, Any] | None, finetune: Mapping[str, Any] | None) -> str:
    lines = [f"principal_energy (eps_w) = {eps_w['value']:g}: {eps_w['rule']}."]
    lines.append(f"  general retention above chance (principal-only): {_fmt_curve(eps_w['general_retention'])}")
    if eps_w["task_retention"]:
        lines.append(f"  task retention above chance ({eps_w['task_source']}): {_fmt_curve(eps_w['task_retention'])}")
        if eps_w["task_sets"] and eps_w["general_retention_same_model"] is not eps_w["general_retention"]:
            lines.append(f"  general retention of that same model: {_fmt_curve(eps_w['general_retention_same_model'])}")
    else:
        lines.append("  no task evidence: no task set is known above chance and no fine-tuning probe reconstructed")
    if gamma is not None:
        lines.append(f"layer_scale_gamma (gamma) = {gamma['value']:g}: {gamma['rule']}.")
        drops = ", ".join(f"{g}: {_pct(d)}" for g, d in gamma["general_drop_perturb"].items())
        lines.append(f"  general accuracy drop, residual perturbed (noise {gamma['perturb_scale']:g}·||W||) per group "
                     f"(shallow -> deep): {drops}")
        resets = ", ".join(f"{g}: {_pct(d)}" for g, d in gamma["general_drop_reset"].items())
        lines.append(f"  general accuracy drop, group reset to its principal part: {resets}")
        if "fit_drop_shallow" in gamma:
            lines.append(f"  fitted drop at depth 0: {_pct(gamma['fit_drop_shallow'])}, at depth 1: "
                         f"{_pct(gamma['fit_drop_deep'])}; noise level (2 s.e.): {_pct(gamma['noise_threshold'])}")
    if finetune is not None and finetune.get("update_split"):
        task = finetune["task"]
        for kind in ("residual", "principal"):
            cells = ", ".join(f"{e}: task {_pct(m['accuracy'][task])} / general {_pct(m['general_mean'])}"
                              for e, m in finetune["update_split"][kind].items())
            lines.append(f"  W + the {kind} part of the {task} update (pre-trained subspaces): {cells}")
    if finetune is not None:
        rows = ", ".join(f"{g}: task {_signed(r['task_gain'])}, general {_signed(-r['general_drop'])}"
                         for g, r in finetune["groups"].items())
        lines.append(f"  LoRA on one group only, trained on {finetune['task']}: {rows}")
    return "\n".join(lines)
