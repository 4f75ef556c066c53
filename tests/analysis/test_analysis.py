"""Each measurement of `keeplora_hf.analysis` on a tiny LLaVA, and the promise that the model comes back unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from keeplora_hf.analysis import (
    FinetuneSpec,
    LayerSpectrum,
    WeightSnapshot,
    analyze,
    depth_groups,
    stack_position,
    target_linears,
)
from keeplora_hf.analysis.interventions import perturb_residual, principal_only, residual_only, target_spectra
from keeplora_hf.analysis.measure import _reset_energy
from keeplora_hf.analysis.probe import train_lora, training_batches
from keeplora_hf.subspace.principal import principal_basis, principal_rank
from keeplora_hf.tuner.depth import layer_scales


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.fixture
def setup(tiny):
    modules = target_linears(tiny.model, tiny.language_targets)
    snapshot = WeightSnapshot(modules)
    return tiny, list(modules), snapshot, target_spectra(snapshot)


# Intra-layer ----------------------------------------------------------------------------------------------------


def test_principal_only_at_energy_one_leaves_outputs_unchanged(setup):
    tiny, names, snapshot, spectra = setup
    batch = tiny.make_batch(3, 5)
    before = _logits(tiny.model, batch)
    with snapshot.intervention():
        principal_only(snapshot, spectra, names, 1.0)
        assert not snapshot.identical()  # the weights were really rewritten (float64 round trip)
        torch.testing.assert_close(_logits(tiny.model, batch), before, atol=1e-5, rtol=1e-5)
    assert snapshot.identical()
    assert torch.equal(_logits(tiny.model, batch), before)


def test_residual_only_at_energy_zero_is_the_model_and_at_one_removes_every_weight(setup):
    tiny, names, snapshot, spectra = setup
    batch = tiny.make_batch(2, 6)
    before = _logits(tiny.model, batch)
    with snapshot.intervention():
        residual_only(snapshot, spectra, names, 0.0)
        torch.testing.assert_close(_logits(tiny.model, batch), before, atol=1e-5, rtol=1e-5)
    with snapshot.intervention():
        residual_only(snapshot, spectra, names, 1.0)
        assert max(snapshot.modules[n].weight.abs().max().item() for n in names) < 1e-5
    assert snapshot.identical()


@pytest.mark.parametrize("energy", [0.0, 0.3, 0.6, 0.95, 1.0])
def test_principal_and_residual_parts_split_the_weight_along_the_methods_basis(setup, energy):
    _, names, snapshot, spectra = setup
    for name in names[:3] + names[-2:]:
        weight, spectrum = snapshot.original[name], spectra[name]
        basis = principal_basis(weight, energy)  # the basis KeepLoRA++ protects, (d_in, p)
        assert spectrum.rank(energy) == basis.shape[1] == principal_rank(spectrum.singular.square(), energy)
        principal = spectrum.principal_part(weight, energy)
        residual = spectrum.residual_part(weight, energy)
        torch.testing.assert_close(principal + residual, weight.double(), atol=1e-12, rtol=0)
        # the principal part acts on span(basis) only, the residual part annihilates it
        torch.testing.assert_close(principal - principal @ basis @ basis.T, torch.zeros_like(principal), atol=1e-5, rtol=0)
        torch.testing.assert_close(residual @ basis, torch.zeros_like(residual @ basis), atol=1e-5, rtol=0)
        kept = spectrum.singular[: basis.shape[1]].square().sum() / spectrum.singular.square().sum()
        torch.testing.assert_close(principal.square().sum() / weight.double().square().sum(), kept, atol=1e-5, rtol=0)


# Inter-layer ----------------------------------------------------------------------------------------------------


def test_residual_perturbation_touches_only_the_group_and_only_its_residual(setup):
    tiny, names, snapshot, spectra = setup
    group = [n for n in names if ".layers.1." in n]
    with snapshot.intervention():
        perturb_residual(snapshot, spectra, group, 0.6, 0.5, seed=3)
        for name in names:
            changed = snapshot.modules[name].weight.detach().double() - snapshot.original[name].double()
            if name not in group:
                assert torch.equal(snapshot.modules[name].weight, snapshot.original[name])
                continue
            basis = principal_basis(snapshot.original[name], 0.6)
            assert (changed @ basis).norm() <= 1e-5 * changed.norm()
            expected = 0.5 * snapshot.original[name].double().norm()
            assert math.isclose(changed.norm().item(), expected.item(), rel_tol=1e-4)
    assert snapshot.identical()


def test_depth_groups_follow_the_methods_depth_per_stack(tiny):
    model = tiny.model
    targets = f"(?:{tiny.language_targets})|(?:{tiny.vision_targets})"
    names = list(target_linears(model, targets))
    normalised = layer_scales(model, names, gamma=0.0)  # gamma 0: s_l = l / (L - 1)
    for name in names:
        stack, index, count = stack_position(model, name)
        assert index / (count - 1) == pytest.approx(normalised[name])
    groups = depth_groups(model, names)
    # two stacks of two layers each: one group per layer, shallow -> deep within each stack
    assert [(g.stack.split(".")[1], g.layers, g.depth) for g in groups] == [
        ("vision_tower", (0, 0), 0.0), ("vision_tower", (1, 1), 1.0),
        ("language_model", (0, 0), 0.0), ("language_model", (1, 1), 1.0),
    ]
    assert sorted(n for g in groups for n in g.targets) == sorted(names)
    one = depth_groups(model, names, 1)
    assert len(one) == 2 and all(g.layers == (0, 1) and g.depth == 0.5 for g in one)
    custom = depth_groups(model, names, {"attention": r".*language_model.*q_proj", "mlp": r".*language_model.*mlp.*"})
    assert [g.name for g in custom] == ["attention", "mlp"] and custom[0].depth == 0.5 and len(custom[1].targets) == 6
    with pytest.raises(ValueError, match="matches no target"):
        depth_groups(model, names, {"none": "nothing"})


def test_lora_probe_trains_only_its_group_and_leaves_the_base_weights(setup):
    tiny, names, snapshot, _ = setup
    group = [n for n in names if ".layers.0." in n]
    spec = FinetuneSpec(task="task", train_dataset=[tiny.make_batch(2, i) for i in range(2)], steps=2, batch_size=1,
                        rank=2, learning_rate=1e-2)
    batch = tiny.make_batch(2, 9)
    before = _logits(tiny.model, batch)
    peft_model = train_lora(tiny.model, group, spec, training_batches(spec), merge=False)
    lora_layers = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                   for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default")}
    assert lora_layers == set(group)
    assert not torch.allclose(_logits(peft_model, batch), before)  # the probe learned something
    assert snapshot.identical()  # LoRA never writes the base weights
    restored = peft_model.unload()
    assert restored is tiny.model
    assert torch.equal(_logits(tiny.model, batch), before)


# The whole analysis ---------------------------------------------------------------------------------------------


def test_analyze_measures_everything_and_returns_the_model_bit_identical(tiny, tiny_sets, tmp_path):
    model = tiny.model
    model.train()
    model.model.vision_tower.requires_grad_(False)  # an unusual grad layout must come back too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _state(model)
    spec = {"task": "task", "train_dataset": [tiny.make_batch(2, i) for i in range(2)], "steps": 2, "batch_size": 1,
            "rank": 2}
    results = analyze(model, tiny_sets, tiny.language_targets, energies=(0.5, 1.0), finetune=spec,
                      output_dir=tmp_path)

    _assert_bit_identical(model, before)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("lora" in n for n, _ in model.named_modules()) and not hasattr(model, "peft_config")

    assert results["baseline"]["accuracy"] == {"general": 1.0, "task": 1.0}
    intra = results["intra_layer"]
    assert intra["principal"]["1"]["accuracy"] == {"general": 1.0, "task": 1.0}  # energy 1: unchanged outputs
    assert intra["principal"]["0.5"]["general_mean"] < 1.0 and intra["residual"]["1"]["general_mean"] < 1.0
    groups = [g["name"] for g in results["groups"]]
    assert len(groups) == 2 and set(results["inter_layer"]["reset"]) == set(groups) == set(results["inter_layer"]["perturb"])
    # the noise scale is the first of the ladder that removes a quarter of the general knowledge, every target at once
    inter = results["inter_layer"]
    ladder = inter["calibration"]
    kept = [ladder[k]["general_mean"] for k in ladder]  # chance 0, baseline 1: accuracy = retention
    assert inter["perturb_scale"] == float(list(ladder)[-1]) and kept[-1] <= 0.75 and all(k > 0.75 for k in kept[:-1])
    assert inter["energy"] == results["recommendation"]["eps_w"]["value"]
    probe = results["finetune"]
    assert set(probe["groups"]) == set(groups)
    assert set(probe["all_groups"]["principal"]) == {"0.5", "1"}
    split = probe["all_groups"]["update_split"]
    assert set(split["residual"]) == set(split["principal"]) == {"0.5"}  # energies strictly between 0 and 1
    # the fine-tuned model's own reconstruction at energy 1 is that fine-tuned model
    assert probe["all_groups"]["principal"]["1"]["accuracy"] == probe["all_groups"]["finetuned"]["accuracy"]
    assert set(results["input_share"]) == {"general", "task"}
    assert set(results["input_share"]["task"]["mean"]) == {"0.5"} and len(results["input_share"]["task"]["layers"]) == 14
    spectra = {row["name"]: row for row in results["spectra"]}
    assert len(spectra) == 14 and all(row["ranks"]["1"] == row["full_rank"] == 32 for row in spectra.values())
    recommendation = results["recommendation"]
    assert {"eps_w", "gamma", "claims", "text"} <= set(recommendation)
    assert "principal_energy (eps_w) =" in recommendation["text"] and "layer_scale_gamma (gamma) =" in recommendation["text"]
    assert {p.name for p in tmp_path.iterdir()} >= {"analysis.json", "summary.md", "intra_layer.png", "depth.png", "spectra.png"}


def test_analyze_restores_the_weights_when_a_metric_fails(tiny, tiny_sets):
    before = _state(tiny.model)
    calls = []

    def failing(model, dataset):
        calls.append(1)
        if len(calls) > 2:  # after the baseline, inside an intervention
            raise RuntimeError("metric broke")
        return 0.5

    sets = dict(tiny_sets, task=(tiny_sets["task"].dataset, failing))
    with pytest.raises(RuntimeError, match="metric broke"):
        analyze(tiny.model, sets, tiny.language_targets, energies=(0.3,))
    _assert_bit_identical(tiny.model, before)


def test_analyze_checks_its_inputs(tiny, tiny_sets):
    with pytest.raises(ValueError, match="two or more eval sets"):
        analyze(tiny.model, {"general": tiny_sets["general"]}, tiny.language_targets)
    with pytest.raises(ValueError, match="no general eval set"):
        analyze(tiny.model, {"a": tiny_sets["general"], "b": tiny_sets["task"]}, tiny.language_targets)
    with pytest.raises(ValueError, match="matches targets"):
        analyze(tiny.model, tiny_sets, r"nothing\.here")
    with pytest.raises(ValueError, match="energies"):
        analyze(tiny.model, tiny_sets, tiny.language_targets, energies=(1.5,))
    with pytest.raises(ValueError, match="finetune task"):
        analyze(tiny.model, tiny_sets, tiny.language_targets, finetune={"task": "x", "train_dataset": []})


def test_layer_spectrum_stores_what_the_report_needs(setup):
    _, names, snapshot, spectra = setup
    spectrum = spectra[names[0]]
    assert isinstance(spectrum, LayerSpectrum) and spectrum.shape == tuple(snapshot.original[names[0]].shape)
    assert torch.all(spectrum.singular[:-1] >= spectrum.singular[1:])


def test_a_failing_probe_leaves_no_lora_layer_behind(tiny, tiny_sets):
    before = _state(tiny.model)

    def broken_loss(model, batch):
        raise RuntimeError("loss broke")

    spec = {"task": "task", "train_dataset": [tiny.make_batch(2, 0)], "steps": 1, "loss_fn": broken_loss}
    with pytest.raises(RuntimeError, match="loss broke"):
        analyze(tiny.model, tiny_sets, tiny.language_targets, energies=(1.0,), finetune=spec)
    assert not any("lora" in n for n, _ in tiny.model.named_modules())
    _assert_bit_identical(tiny.model, before)


def test_reset_energy_is_where_resetting_every_target_starts_to_lose_general_knowledge():
    retention = {"0.2": -0.5, "0.4": 0.3, "0.6": 0.85, "0.8": 1.0, "0.9": 0.99, "1": 1.0}
    assert _reset_energy(retention, below=0.8) == 0.6
    assert _reset_energy(retention, below=0.6) == 0.4
    assert _reset_energy({"0.5": 0.95, "0.9": 1.0}, below=0.9) == 0.5  # nothing loses: the lowest tested energy


def test_input_share_is_the_inputs_energy_inside_the_methods_principal_basis(setup, tiny_sets):
    """`‖x P‖² / ‖x‖²` of every target input seen while a set is evaluated, P the method's own principal basis."""
    from keeplora_hf.analysis.measure import _Context, _input_share

    tiny, names, snapshot, spectra = setup
    ctx = _Context(tiny.model, tiny_sets, ["general"], ["task"], snapshot, spectra, names)
    share = _input_share(ctx, (0.0, 0.5, 0.9, 1.0))

    assert set(share) == {"general", "task"}
    assert set(share["general"]["mean"]) == {"0.5", "0.9"}  # 0 and 1 are trivially 0 % and (d_out >= d_in) 100 %
    name = names[0]
    seen = []
    handle = snapshot.modules[name].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    tiny_sets["general"].metric(tiny.model, tiny_sets["general"].dataset)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    for energy in (0.5, 0.9):
        basis = principal_basis(snapshot.modules[name].weight.detach(), energy).double()
        expected = ((x @ basis).square().sum() / x.square().sum()).item()
        assert share["general"]["layers"][name][f"{energy:g}"] == pytest.approx(expected, rel=1e-5)
    for result in share.values():
        assert 0.0 < result["mean"]["0.5"] < result["mean"]["0.9"] < 1.0
