"""The ε_w and γ rules of `keeplora_hf.analysis.recommend`, on hand-made measurements whose answer is known."""

from __future__ import annotations

import pytest

from keeplora_hf.analysis import DEFAULT_EPS_W, DEFAULT_GAMMA, recommend, recommend_eps_w, recommend_gamma

ENERGIES = ("0.2", "0.4", "0.6", "0.8", "0.9", "1")


def _m(general: float, task: float) -> dict:
    return {"accuracy": {"general": general, "task": task}, "general_mean": general, "task_mean": task}


def _results(general_curve, task_curve, *, base=(0.9, 0.8), chance=(0.5, 0.0), size=1000) -> dict:
    return {
        "eval_sets": {"general": {"chance": chance[0], "size": size, "general": True},
                      "task": {"chance": chance[1], "size": size, "general": False}},
        "general_sets": ["general"],
        "task_sets": ["task"],
        "baseline": _m(*base),
        "intra_layer": {"principal": {e: _m(g, t) for e, g, t in zip(ENERGIES, general_curve, task_curve)},
                        "residual": {}},
    }


CHANCES = {"general": 0.5, "task": 0.0}


def test_eps_w_is_the_largest_energy_keeping_general_knowledge_while_task_knowledge_falls():
    # general retention above chance 0.5: (acc - 0.5) / 0.4
    general = (0.6, 0.80, 0.87, 0.89, 0.9, 0.9)  # retention 25%, 75%, 92.5%, 97.5%, 100%, 100%
    task = (0.1, 0.2, 0.3, 0.5, 0.78, 0.8)  # retention 12.5%, 25%, 37.5%, 62.5%, 97.5%, 100%
    result = recommend_eps_w(_results(general, task), CHANCES)
    assert result["candidates"] == [0.6, 0.8, 0.9]
    assert result["value"] == 0.8 and result["claim_holds"]  # at 0.9 the task keeps 97.5%: it does not fall
    assert result["at_value"]["general_retention"] == pytest.approx(0.975)
    assert result["at_value"]["task_retention"] == pytest.approx(0.625)


def test_eps_w_falls_back_to_the_smallest_sufficient_energy_without_task_evidence():
    general = (0.6, 0.80, 0.87, 0.89, 0.9, 0.9)
    task = (0.0,) * 6
    # the task set is at chance before any intervention: it holds no knowledge to lose
    result = recommend_eps_w(_results(general, task, base=(0.9, 0.01)), CHANCES)
    assert result["value"] == 0.6 and not result["claim_holds"] and "no task evidence" in result["rule"]
    # a task that falls exactly as the general sets do is no evidence for the split either
    same = tuple(0.8 * (g - 0.5) / 0.4 for g in general)
    result = recommend_eps_w(_results(general, same), CHANCES)
    assert result["value"] == 0.6 and not result["claim_holds"] and "does not fall" in result["rule"]


def test_eps_w_keeps_the_default_when_no_energy_below_one_keeps_general_knowledge():
    result = recommend_eps_w(_results((0.5, 0.5, 0.55, 0.6, 0.7, 0.9), (0.0,) * 5 + (0.8,)), CHANCES)
    assert result["value"] == DEFAULT_EPS_W and not result["claim_holds"] and result["candidates"] == []


def test_eps_w_prefers_the_fine_tuned_task_when_the_probe_reconstructed():
    results = _results((0.6, 0.80, 0.87, 0.89, 0.9, 0.9), (0.8,) * 6)  # the known task never falls ...
    results["finetune"] = {"task": "task", "groups": {}, "all_groups": {
        "finetuned": _m(0.9, 1.0),
        # ... but the knowledge the fine-tuning added lives outside the principal part until 0.9
        "principal": {e: _m(g, t) for e, g, t in zip(ENERGIES, (0.6, 0.8, 0.88, 0.9, 0.9, 0.9),
                                                      (0.1, 0.2, 0.3, 0.6, 0.95, 1.0))},
    }}
    result = recommend_eps_w(results, CHANCES)
    assert result["value"] == 0.8 and result["claim_holds"] and "fine-tuned" in result["task_source"]


def _inter(drops: list[float], depths: list[float], base: float = 0.9, size: int = 1000) -> dict:
    results = _results((0.9,) * 6, (0.8,) * 6, base=(base, 0.8), size=size)
    names = [f"g{i}" for i in range(len(drops))]
    results["groups"] = [{"name": n, "depth": d} for n, d in zip(names, depths)]
    results["inter_layer"] = {
        "perturb_scale": 1.0,
        "reset": {n: _m(base - d / 2, 0.8) for n, d in zip(names, drops)},
        "perturb": {n: _m(base - d, 0.8) for n, d in zip(names, drops)},
    }
    return results


def test_gamma_equalises_the_general_damage_of_shallow_and_deep_updates():
    result = recommend_gamma(_inter([0.4, 0.3, 0.2, 0.1], [0, 1 / 3, 2 / 3, 1]))
    assert result["decided"]
    assert result["fit_drop_shallow"] == pytest.approx(0.4) and result["fit_drop_deep"] == pytest.approx(0.1)
    assert result["raw"] == pytest.approx(0.25) and result["value"] == 0.25
    # a clipped ratio and a noisy but decreasing profile
    assert recommend_gamma(_inter([0.5, 0.0], [0, 1]))["value"] == 0.1
    assert recommend_gamma(_inter([0.3, 0.2, 0.25, 0.15], [0, 1 / 3, 2 / 3, 1]))["value"] == pytest.approx(0.6)  # fit: 0.285 -> 0.165


def test_gamma_is_one_when_deep_layers_matter_as_much_and_default_without_signal():
    deeper = recommend_gamma(_inter([0.1, 0.2, 0.3], [0, 0.5, 1]))
    assert deeper["value"] == 1.0 and deeper["decided"]
    quiet = recommend_gamma(_inter([0.005, 0.0, 0.002], [0, 0.5, 1], size=100))  # below 2 s.e. (6% at n=100)
    assert quiet["value"] == DEFAULT_GAMMA and not quiet["decided"] and "cannot decide" in quiet["rule"]
    single = recommend_gamma(_inter([0.3], [0.5]))
    assert single["value"] == DEFAULT_GAMMA and not single["decided"]


def test_recommend_states_its_evidence_and_the_claims():
    results = _inter([0.4, 0.3, 0.2, 0.1], [0, 1 / 3, 2 / 3, 1])
    results["intra_layer"] = _results((0.6, 0.80, 0.87, 0.89, 0.9, 0.9), (0.1, 0.2, 0.3, 0.5, 0.78, 0.8))["intra_layer"]
    out = recommend(results)
    assert out["claims"] == {"intra_layer": True, "inter_layer": True}
    assert out["eps_w"]["value"] == 0.8 and out["gamma"]["value"] == 0.25
    text = out["text"]
    assert "principal_energy (eps_w) = 0.8" in text and "layer_scale_gamma (gamma) = 0.25" in text
    assert "0.6: 92.5%" in text  # the general retention it rests on
    assert "g0: 40.0%" in text  # the drop per group
