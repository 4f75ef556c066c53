"""feature_source='mean_gradient': the statistic is G^T G of the task's mean weight gradient, as the reference's LLaVA path."""

from __future__ import annotations

import torch

from keeplora_hf import begin_task, end_task
from keeplora_hf.tuner.feature_memory import feature_covariances

from keeplora_setups import targets, wrap


def _brute_force(model, samples) -> dict[str, torch.Tensor]:
    """G = sum over samples of each one's loss gradient w.r.t. every target weight, then G^T G (float64)."""
    layers = targets(model)
    weights = {n: m.get_base_layer().weight for n, m in layers.items()}
    gradients = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for sample in samples:
        grads = torch.autograd.grad(model(**sample).loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            gradients[name] += grad.double()
    for w in weights.values():
        w.requires_grad_(False)
    return {n: g.T @ g for n, g in gradients.items()}


def test_the_mean_gradient_statistic_equals_its_definition():
    model, batches, tiny = wrap("llava", feature_source="mean_gradient", gradient_data_ratio=1.0)
    samples = [tiny.make_batch(1, seed) for seed in range(4)]  # batch size 1, as the reference extracts them
    begin_task(model, samples)
    for module in targets(model).values():  # a trained B, so the statistic is taken at the trained model
        with torch.no_grad():
            module.lora_B["default"].weight.normal_(std=0.05)
    sketched = feature_covariances(model, samples)
    exact = _brute_force(model, samples)
    for name, reference in exact.items():
        gap = (sketched[name].double() - reference).norm() / reference.norm()
        assert gap < 1e-4, (name, float(gap))  # the sketch is exact: every tiny layer has d_out <= memory_sketch_rows
    end_task(model, samples)
    assert all(m.keeplora_state["default"].memory_rank > 0 for m in targets(model).values())


def test_a_narrow_sketch_is_a_compression_of_the_statistic():
    """With fewer rows than d_out, X^T X = G^T Psi^T Psi G never exceeds G^T G in any direction (Psi has orthonormal
    rows), so the memory can only miss energy, never invent directions the gradient lacks."""
    model, _, tiny = wrap("llava", feature_source="mean_gradient", memory_sketch_rows=8, gradient_data_ratio=1.0)
    samples = [tiny.make_batch(1, seed) for seed in range(4)]
    begin_task(model, samples)
    sketched = feature_covariances(model, samples)
    exact = _brute_force(model, samples)
    for name, reference in exact.items():
        excess = torch.linalg.eigvalsh(reference - sketched[name].double())[0]
        assert excess >= -1e-4 * torch.linalg.eigvalsh(reference)[-1], name
        assert torch.trace(sketched[name]) > 0, name
