"""begin_task / training / end_task on every tiny architecture: the guarantees of docs/method.md, measured."""

from __future__ import annotations

import pytest
import torch

from keeplora_hf import attach_residual_projection, begin_task, end_task, protected_basis
from keeplora_hf.subspace import principal_basis

from keeplora_setups import outputs, targets, wrap


def test_begin_task_keeps_outputs_and_puts_A_in_the_residual(tiny_name):
    model, batches, _ = wrap(tiny_name)
    before = outputs(model, batches[0])
    begin_task(model, batches)
    assert torch.equal(outputs(model, batches[0]), before)
    layers = targets(model)
    assert layers
    for name, module in layers.items():
        lora_A = module.lora_A["default"].weight
        protected = protected_basis(model, name)
        assert protected.shape[0] == lora_A.shape[1]
        assert lora_A.abs().sum() > 0, name
        assert (lora_A @ protected.to(lora_A.dtype)).abs().max() < 1e-5, name
        assert torch.count_nonzero(module.lora_B["default"].weight) == 0


def _train(model, batches, steps: int, accumulation: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.01)
    attach_residual_projection(optimizer, model)
    model.train()
    for step in range(steps * accumulation):
        loss = model(**batches[step % len(batches)]).loss / accumulation
        loss.backward()
        if (step + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("train_lora_A", [False, True], ids=["frozen_A", "trained_A"])
def test_merged_update_avoids_the_protected_subspace(tiny_name, train_lora_A):
    model, batches, _ = wrap(tiny_name, train_lora_A=train_lora_A)
    layers = targets(model)
    originals = {name: m.get_base_layer().weight.detach().clone() for name, m in layers.items()}
    begin_task(model, batches)
    lora_A_start = {name: m.lora_A["default"].weight.detach().clone() for name, m in layers.items()}
    protected = {name: protected_basis(model, name) for name in layers}
    _train(model, batches, steps=4, accumulation=2)
    for name, module in layers.items():
        moved = not torch.equal(module.lora_A["default"].weight, lora_A_start[name])
        assert moved == train_lora_A, name
    end_task(model, batches)
    worst = 0.0
    for name, module in layers.items():
        delta = module.get_base_layer().weight.detach() - originals[name]
        assert delta.norm() > 0, f"{name} learned nothing"
        worst = max(worst, (delta @ protected[name]).norm().item() / delta.norm().item())
    assert worst <= 1e-4, worst


def test_layer_scales_run_from_gamma_to_one_in_each_stack():
    model, _, _ = wrap("llava", layer_scale_gamma=0.2)
    base_scale = 8 / 4
    scales = {name: m.scaling["default"] / base_scale for name, m in targets(model).items()}
    for stack in ("language_model", "vision_tower"):
        first = {n: s for n, s in scales.items() if stack in n and ".layers.0." in n}
        last = {n: s for n, s in scales.items() if stack in n and ".layers.1." in n}
        assert first and last
        assert all(abs(s - 0.2) < 1e-12 for s in first.values()), first
        assert all(abs(s - 1.0) < 1e-12 for s in last.values()), last
    model, _, _ = wrap("llava", layer_scale_gamma=1.0)
    assert all(m.scaling["default"] == base_scale for m in targets(model).values())


def test_principal_basis_comes_from_the_original_weights_and_never_changes():
    model, batches, _ = wrap("llava", principal_energy=0.6)
    layers = targets(model)
    originals = {name: m.get_base_layer().weight.detach().clone() for name, m in layers.items()}
    for task in range(2):
        begin_task(model, batches)
        _train(model, batches, steps=2, accumulation=1)
        end_task(model, batches)
    for name, module in layers.items():
        state = module.keeplora_state["default"]
        expected = principal_basis(originals[name], 0.6).float()
        assert state.principal.shape == expected.shape
        assert torch.allclose(state.principal @ state.principal.T, expected @ expected.T, atol=1e-5), name
        assert not torch.equal(module.get_base_layer().weight, originals[name])
        assert len(state.tasks) == 2


def test_feature_memory_grows_and_stays_within_d_in():
    model, batches, _ = wrap("llava", principal_energy=0.3, feature_energy=0.999)
    layers = targets(model)
    sizes = []
    for seed in range(3):
        task = [b for b in batches]  # same data: later tasks should add little
        begin_task(model, task)
        _train(model, task, steps=1, accumulation=1)
        end_task(model, task)
        sizes.append({name: m.keeplora_state["default"].memory.shape[1] for name, m in layers.items()})
    for name, module in layers.items():
        state = module.keeplora_state["default"]
        d_in = module.get_base_layer().in_features
        assert state.principal.shape[1] + state.memory.shape[1] <= d_in
        basis = protected_basis(model, name)
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4), name
        assert sizes[0][name] > 0 and sizes[0][name] <= sizes[1][name] <= sizes[2][name]


def test_gradient_feature_source_builds_memory():
    model, batches, _ = wrap("qwen2_vl", feature_source="gradients")
    begin_task(model, batches)
    _train(model, batches, steps=2, accumulation=1)
    end_task(model, batches)
    assert all(m.keeplora_state["default"].memory.shape[1] > 0 for m in targets(model).values())


@pytest.mark.parametrize("init", ["random", "minor_singular"])
def test_baseline_initialisations_stay_in_the_residual(init):
    model, batches, _ = wrap("llava", lora_A_init=init, train_lora_A=True)
    begin_task(model, batches)
    for name, module in targets(model).items():
        lora_A = module.lora_A["default"].weight
        assert lora_A.abs().sum() > 0
        assert (lora_A @ protected_basis(model, name)).abs().max() < 1e-5, name
    if init == "minor_singular":
        module = next(iter(targets(model).values()))
        _, _, vh = torch.linalg.svd(module.get_base_layer().weight.double())
        lora_A = module.lora_A["default"].weight.double()
        # the weight's minor directions that the principal subspace does not claim: A lies in the span of the last r
        assert torch.allclose(lora_A @ vh[: -lora_A.shape[0]].T, torch.zeros(lora_A.shape[0], vh.shape[0] - lora_A.shape[0], dtype=torch.float64), atol=1e-5)
