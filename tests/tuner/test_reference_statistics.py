"""The reference CLIP code's statistics as options: `principal_side="left"` (U[:, :p] of svd(W) protected as input
directions) and `activation_statistic="position_mean"` (the memory from the position-aligned mean of the batches'
inputs), each checked against a hand computation, on the devices and on float32 / bfloat16 bases."""

from __future__ import annotations

import pytest
import torch

from keeplora_hf import begin_task, end_task, protected_basis
from keeplora_hf.models import build_tiny
from keeplora_hf.subspace import PositionMeanStatistics, principal_basis
from keeplora_hf.tuner.feature_memory import feature_covariances
from peft import PeftModel

from keeplora_setups import learn, outputs, targets, wrap

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_left_side_protects_the_left_singular_vectors_of_each_weight(device, dtype):
    model, batches, _ = wrap("clip", principal_side="left", keep_principal_basis=True, device=device, dtype=dtype)
    originals = {name: m.get_base_layer().weight.detach().float().clone() for name, m in targets(model).items()}
    begin_task(model, batches)
    differs = 0
    for name, module in targets(model).items():
        principal = module.keeplora_state["default"].principal.float()
        left = principal_basis(originals[name], 0.6, side="left").to(principal)
        right = principal_basis(originals[name], 0.6).to(principal)
        tolerance = 1e-5 if dtype == torch.float32 else 5e-3  # a bfloat16 base stores the state in float16
        assert torch.allclose(principal @ principal.T, left @ left.T, atol=tolerance), name
        differs += bool((left @ left.T - right @ right.T).abs().max() > 0.1)
        lora_A = module.lora_A["default"].weight.float()
        assert (lora_A @ protected_basis(model, name).float().to(lora_A)).abs().max() < 1e-5, name
    assert differs == len(originals)  # q, k, v, out_proj are square, and their two sides differ


def test_left_side_refuses_a_non_square_target_by_name():
    with pytest.raises(ValueError, match=r"principal_side='left'.*'model\.language_model\.layers\.0\.mlp\.gate_proj' is 64 x 32"):
        wrap("llava", principal_side="left")


def _reference_accumulation(batches: list[torch.Tensor]) -> torch.Tensor:
    """The reference's `accumulate_features` (d x rows): acc <- n/(n+m) acc + 1/(n+m) x^T, n counting rows."""
    acc, n = None, 0
    for x in batches:
        rows = x.reshape(-1, x.shape[-1]).double()
        m = rows.shape[0]
        acc = rows.T / (n + m) if acc is None else n / (n + m) * acc + rows.T / (n + m)
        n += m
    return acc


def test_position_mean_has_the_reference_left_singular_vectors_and_energy_shares():
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(3, 5, 8, generator=g) + torch.linspace(0, 2, 8) for _ in range(4)]
    statistic = PositionMeanStatistics(8, dtype=torch.float64)
    for x in [*full, torch.randn(2, 5, 8, generator=g)]:  # a short last batch is left out, as drop_last does
        statistic.update(x)
    assert statistic.skipped == 1 and int(statistic.batches) == 4
    values, vectors = torch.linalg.eigh(statistic.covariance)
    u, s, _ = torch.linalg.svd(_reference_accumulation(full), full_matrices=False)
    assert torch.allclose(values.flip(0) / values.sum(), s.square() / s.square().sum(), atol=1e-12)
    top = vectors[:, -3:]
    assert torch.allclose(top @ top.T, u[:, :3] @ u[:, :3].T, atol=1e-8)


def test_position_mean_memory_statistic_is_computed_from_the_layer_inputs(device):
    model, batches, _ = wrap("clip", activation_statistic="position_mean", device=device)
    begin_task(model, batches)
    learn(model, batches)
    name, layer = next((n, m) for n, m in targets(model).items() if "vision_model" in n and "q_proj" in n)
    seen = []
    handle = layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().double().cpu()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    mean = sum(x.reshape(-1, x.shape[-1]) for x in seen) / len(seen)
    covariance = feature_covariances(model, batches)[name].double().cpu()
    assert torch.allclose(covariance, mean.T @ mean, rtol=1e-5, atol=1e-6 * float(covariance.abs().max()))
    end_task(model, batches)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_both_reference_options_learn_save_and_load_exactly(tmp_path, device, dtype):
    options = dict(principal_side="left", activation_statistic="position_mean")
    model, batches, _ = wrap("clip", device=device, dtype=dtype, **options)
    originals = {name: m.get_base_layer().weight.detach().float().clone() for name, m in targets(model).items()}
    for _ in range(2):
        begin_task(model, batches)
        learn(model, batches)
        end_task(model, batches)
    model.save_pretrained(tmp_path)
    base = build_tiny("clip").model.to(device=device, dtype=dtype)
    reloaded = PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    config = reloaded.peft_config["default"]
    assert (config.principal_side, config.activation_statistic) == ("left", "position_mean")
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))
    for name, module in targets(reloaded).items():
        state = module.keeplora_state["default"]
        principal = state.principal.float()  # recomputed from the original weight when only the complement is kept
        left = principal_basis(originals[name], 0.6, side="left", rank=state.principal_rank).to(principal)
        assert torch.allclose(principal @ principal.T, left @ left.T, atol=1e-5 if dtype == torch.float32 else 5e-3)
    begin_task(reloaded, batches)  # the sequence goes on from the loaded state
    end_task(reloaded, batches)
