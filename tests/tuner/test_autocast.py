"""Finished tasks under a 16-bit autocast (`Trainer(bf16=True)`, accelerate's `mixed_precision`): the frozen branch
runs in the autocast dtype with `A` split into two 16-bit halves, and keeps each finished update out of the protected
subspace as the float32 branch does (docs/precision.md)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from keeplora_hf import begin_task, end_task, learned_update, project_lora_A_, protected_basis
from keeplora_hf.tuner.finished import FrozenBranch
from keeplora_hf.tuner.layer import layer_state

from keeplora_setups import learn, outputs, targets, wrap

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
#: the guarantee's bound on `||Delta W P|| / ||Delta W||` (docs/precision.md)
LEAK_BOUND = 1e-4


def _leak(delta: torch.Tensor, protected: torch.Tensor) -> float:
    return float((delta @ protected.double()).norm() / delta.norm())


def _branch(device: str, d_in: int = 256, d_out: int = 384, tasks: int = 4, rank: int = 8):
    """Finished tasks whose `A` rows avoid a protected half of the input space, as `end_task` leaves them."""
    g = torch.Generator().manual_seed(0)
    protected = torch.linalg.qr(torch.randn(d_in, d_in // 2, generator=g, dtype=torch.float64))[0]
    a = torch.randn(tasks * rank, d_in, generator=g, dtype=torch.float64)
    a = torch.linalg.qr((a - (a @ protected) @ protected.T).T)[0].T
    b = torch.randn(d_out, tasks * rank, generator=g) * 1e-2
    branch = FrozenBranch(a.float().to(device), b.to(device), [rank] * tasks, [0.5] * tasks)
    return branch, protected.float().to(device)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_the_split_branch_keeps_finished_updates_out_of_the_protected_subspace(device, dtype):
    branch, protected = _branch(device)
    rounded = branch.lora_B.double() @ branch.lora_A.to(dtype).double()  # A rounded to 16 bits: what autocast did
    assert _leak(branch.applied_update(), protected) < 1e-6
    assert _leak(branch.applied_update(dtype), protected) < LEAK_BOUND / 10
    assert _leak(rounded, protected) > LEAK_BOUND  # the hazard is real at these shapes


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_under_autocast_the_branch_adds_its_applied_update_to_the_output_in_its_dtype(device, dtype):
    branch, _ = _branch(device)
    d_out, d_in = branch.lora_B.shape[0], branch.lora_A.shape[1]
    x = torch.randn(2, 16, d_in, device=device).to(dtype).requires_grad_(True)
    weight = torch.randn(d_out, d_in, device=device).to(dtype)
    eps = torch.finfo(dtype).eps
    with torch.autocast(torch.device(device).type, dtype=dtype):
        base = torch.nn.functional.linear(x, weight).detach().requires_grad_(True)
        out = branch(x, base)
    assert out.dtype == dtype and out.shape == base.shape
    added = x.detach().double() @ branch.applied_update(dtype).T
    # two roundings on the way (the halves' products, the inner sum's), one of the total; none of the update
    bound = 4 * eps * added.abs().max() + eps * out.double().abs().max()
    assert (out.double() - (base.detach().double() + added)).abs().max() <= bound
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(base.grad, grad)  # the base output's gradient passes through untouched
    # the backward takes A_hi alone (a 16-bit gradient, as the base layer's and LoRA's): within a 16-bit rounding of
    # the applied update's transpose
    expected = grad.double() @ branch.applied_update(dtype)
    assert (x.grad.double() - expected).abs().max() <= 4 * eps * expected.abs().max()
    exact = branch(x.detach(), base.detach())  # outside autocast: float32, the exact path
    assert exact.dtype == torch.float32
    expected_exact = base.detach().double() + x.detach().double() @ branch.applied_update().T
    assert (exact.double() - expected_exact).abs().max() <= 1e-5 * expected_exact.abs().max()


def test_a_bfloat16_model_under_autocast_applies_its_finished_tasks_through_the_split_branch(device):
    """Two tasks finished (the frozen branch of a bfloat16 base), then the model under autocast: what each target's
    branch adds is its reported learned update, and inputs in the principal subspace, which both tasks' updates
    avoid, get nothing but rounding."""
    dtype = torch.bfloat16
    model, batches, _ = wrap("llava", dtype=dtype, device=device)
    principal = {}
    for picks in ((0, 1), (1, 2)):
        begin_task(model, [batches[i] for i in picks])
        principal = principal or {name: protected_basis(model, name).float() for name in targets(model)}
        learn(model, [batches[i] for i in picks])
        end_task(model, [batches[i] for i in picks])
    begin_task(model, [batches[2]])  # a third task under way: its LoRA starts at B = 0, so only the branch acts
    device_type = torch.device(device).type
    eps = torch.finfo(dtype).eps
    for name, module in targets(model).items():
        state = layer_state(module, "default")
        assert state.branched_tasks == 2
        protected = principal[name]
        update = learned_update(model, name).double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, update.shape[1], generator=g).to(device=device, dtype=dtype)
        inside = (torch.randn(8, protected.shape[1], generator=g).to(protected) @ protected.T).to(dtype)
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            added = module(x).double() - module.get_base_layer()(x).double()
            moved = module(inside).double() - module.get_base_layer()(inside).double()
        expected = x.double() @ update.T
        largest = module.get_base_layer()(x).double().abs().max()
        assert (added - expected).abs().max() <= 2 * eps * largest + 4 * eps * expected.abs().max(), name
        assert _leak(state._branch.applied_update(dtype).double(), protected) < LEAK_BOUND, name
        # protected rows: their own rounding off the subspace (|dW| |off|) and one rounding of the output, no more
        off = inside.double() - (inside.double() @ protected.double()) @ protected.double().T
        bound = torch.linalg.matrix_norm(update, ord=2) * off.norm(dim=1, keepdim=True) + 2 * eps * largest
        assert (moved.abs() <= bound).all(), name
    with torch.autocast(device_type, dtype=dtype):
        loss = model(**batches[2]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert outputs(model, batches[0]).dtype == dtype


def test_the_lifecycle_called_inside_autocast_computes_as_outside_it(device):
    """A custom loop may call begin_task, end_task, project_lora_A_, learned_update and protected_basis inside its
    16-bit autocast region: they compute bit for bit as outside it (16-bit products would tilt A and the merged
    updates about 1e-3 into the protected subspace)."""
    device_type = torch.device(device).type
    runs = []
    for inside in (False, True):
        region = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if inside else nullcontext
        model, batches, _ = wrap("llava", device=device, train_lora_A=True)  # float32: finished tasks merge
        seen: dict[str, torch.Tensor] = {}
        for t, picks in enumerate(((0, 1), (1, 2))):
            task = [batches[i] for i in picks]
            with region():
                begin_task(model, task)
            layers = targets(model)
            seen |= {f"{t} A at begin {n}": m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
            learn(model, task)  # outside autocast in both runs
            with region():
                project_lora_A_(model)
            seen |= {f"{t} A projected {n}": m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
            with region():
                end_task(model, task)
                seen |= {f"{t} update {n}": learned_update(model, n) for n in layers}
                seen |= {f"{t} basis {n}": protected_basis(model, n) for n in layers}
            seen |= {f"{t} weight {n}": m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        runs.append(seen)
    outside, inside = runs
    assert outside.keys() == inside.keys()
    differing = [key for key in outside if not torch.equal(outside[key], inside[key])]
    assert not differing, differing[:5]
