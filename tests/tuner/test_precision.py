"""The KeepLoRA++ guarantees on every device and base dtype: float32 and bfloat16 bases, cpu and cuda where present.

Bounds used here (stated in docs/precision.md):
- bfloat16 forward noise: logits of the base model in bfloat16 against the same weights in float32, `noise`;
- one rounding step of a bfloat16 value `v`: at most `eps * |v|` with `eps = torch.finfo(torch.bfloat16).eps`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, export_lora, learned_update, protected_basis
from keeplora_hf.models import build_tiny

from keeplora_setups import learn, outputs, targets, wrap

DTYPES = [torch.float32, torch.bfloat16]
_TASKS = ((0, 1), (1, 2), (2, 0))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inputs(protected: torch.Tensor, like: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows inside the protected subspace and random rows of the same norm, in the layer's dtype and device."""
    g = torch.Generator().manual_seed(seed)
    inside = torch.randn(6, protected.shape[1], generator=g).to(protected) @ protected.T.to(protected)
    anywhere = torch.randn(6, protected.shape[0], generator=g).to(protected)
    anywhere = anywhere * inside.norm(dim=1, keepdim=True) / anywhere.norm(dim=1, keepdim=True)
    return inside.to(like), anywhere.to(like)


def _reference_logits(name: str, model, batch) -> torch.Tensor:
    """Logits of the pre-trained model in float32 plus every target's learned update, added in float32."""
    reference = build_tiny(name).model.float().to(batch["input_ids"].device)
    with torch.no_grad():
        for target in targets(model):
            layer = reference.get_submodule(target.removeprefix("base_model.model."))
            layer.weight += learned_update(model, target).to(layer.weight)
    return outputs(reference, _float32(batch)).float()


def _float32(batch: dict) -> dict:
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_three_tasks_keep_the_guarantee_on_every_base_dtype(device, dtype):
    """Default config: each task's function survives end_task, protected inputs stay put, nothing accumulates."""
    model, batches, _ = wrap("llava", dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    pretrained = build_tiny("llava").model.to(device=device, dtype=dtype)
    # bf16 forward noise: the same pre-trained weights run in bfloat16 and in float32
    noise = (outputs(pretrained, batches[0]).float() - outputs(pretrained.float(), _float32(batches[0])).float()).abs().max()
    for t, picks in enumerate(_TASKS):
        task = [batches[i] for i in picks]
        begin_task(model, task)
        probes = {}
        for name, module in targets(model).items():
            weight = module.get_base_layer().weight
            protected = protected_basis(model, name).float()
            inside, anywhere = _inputs(protected, weight, seed=t)
            # a bfloat16 row is rounded off the subspace: the part of it the task's update may act on
            off = inside.float() - (inside.float() @ protected) @ protected.T
            with torch.no_grad():
                probes[name] = (inside, anywhere, module(inside), module(anywhere), off, learned_update(model, name))
        learn(model, task)
        before = outputs(model, batches[0]).float()
        end_task(model, task)
        after = outputs(model, batches[0]).float()
        # the task's logits just before and just after end_task: bitwise for the first task in bfloat16; later, the
        # live LoRA and the earlier tasks' branch are rounded once each before, together after: within forward noise
        bound = 0 if t == 0 and dtype == torch.bfloat16 else noise + 1e-5 * before.abs().max()
        assert (after - before).abs().max() <= bound, (t, noise)

        moved_inside = moved_anywhere = 0.0
        for name, module in targets(model).items():
            inside, anywhere, out_inside, out_anywhere, off, earlier = probes[name]
            with torch.no_grad():
                change = (module(inside) - out_inside).float()
                moved_anywhere += (module(anywhere) - out_anywhere).float().abs().sum().item()
            largest = torch.maximum(out_inside.float().abs(), (out_inside + change).float().abs())
            # bfloat16: one rounding step of the output, plus what the task's update does to the input's own rounding
            # off the subspace (|dW| * |off|, per row); float32: 1e-5 of the largest output
            update = torch.linalg.matrix_norm(learned_update(model, name) - earlier, ord=2)
            rounding = update * off.norm(dim=1, keepdim=True)
            bound = eps * largest + rounding + 1e-6 if dtype == torch.bfloat16 else 1e-5 * largest.max() + 1e-7
            assert (change.abs() <= bound).all(), (t, name, (change.abs() - bound).max().item())
            moved_inside += change.abs().sum().item()
        assert moved_anywhere > 100 * max(moved_inside, 1e-12), (t, moved_inside, moved_anywhere)

    # base + the three updates computed in float32, within the bfloat16 forward noise: no rounding accumulated
    reference = _reference_logits("llava", model, batches[0])
    gap = (outputs(model, batches[0]).float() - reference).abs().max()
    assert gap <= 3 * noise + 1e-4 * reference.abs().max(), (gap, noise)


@pytest.mark.parametrize(
    ("dtype", "finished_tasks"), [(torch.bfloat16, "auto"), (torch.float32, "branch")], ids=["bfloat16-auto", "float32-branch"]
)
def test_disable_adapter_gives_the_pretrained_model_while_tasks_are_unmerged(device, dtype, finished_tasks):
    model, batches, _ = wrap("llava", dtype=dtype, device=device, finished_tasks=finished_tasks)
    pretrained = outputs(model, batches[0])
    for picks in _TASKS[:2]:
        begin_task(model, [batches[i] for i in picks])
        learn(model, [batches[i] for i in picks])
        end_task(model, [batches[i] for i in picks])
    assert not torch.equal(outputs(model, batches[0]), pretrained)
    with model.disable_adapter():
        assert torch.equal(outputs(model, batches[0]), pretrained)
    for module in targets(model).values():
        assert module.keeplora_state["default"].merged_tasks == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_save_load_and_export_are_exact_on_every_base_dtype(tmp_path, device, dtype):
    model, batches, _ = wrap("llava", dtype=dtype, device=device)
    for picks in _TASKS[:2]:
        begin_task(model, [batches[i] for i in picks])
        learn(model, [batches[i] for i in picks])
        end_task(model, [batches[i] for i in picks])
    expected = outputs(model, batches[0])
    model.save_pretrained(tmp_path / "adapter")
    base = build_tiny("llava").model.to(device=device, dtype=dtype)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(outputs(reloaded, batches[0]), expected)

    export_lora(model, tmp_path / "lora")
    plain = PeftModel.from_pretrained(build_tiny("llava").model.to(device=device, dtype=dtype), tmp_path / "lora")
    # the plain LoRA holds the same float32 updates, applied as one rank-(k r) branch: summation order differs
    tolerance = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * expected.abs().max().item()
    assert (outputs(plain, batches[0]).float() - expected.float()).abs().max() <= tolerance


def test_merge_and_unload_folds_the_branches_with_one_rounding(device):
    model, batches, _ = wrap("llava", dtype=torch.bfloat16, device=device)
    for picks in _TASKS:
        begin_task(model, [batches[i] for i in picks])
        learn(model, [batches[i] for i in picks])
        end_task(model, [batches[i] for i in picks])
    names = list(targets(model))
    updates = {name: learned_update(model, name) for name in names}
    originals = {name: targets(model)[name].get_base_layer().weight.detach().clone() for name in names}
    merged = model.merge_and_unload()
    for name in names:
        weight = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        expected = (originals[name].float() + updates[name]).to(torch.bfloat16)
        assert torch.equal(weight, expected), name


def test_the_state_follows_the_model_to_a_device_never_to_a_dtype(device):
    model, batches, _ = wrap("llava")
    begin_task(model, batches[:2])
    learn(model, batches[:2])
    end_task(model, batches[:2])
    model.to(device=device, dtype=torch.bfloat16)
    for module in targets(model).values():
        state = module.keeplora_state["default"]
        buffers = dict(state.named_buffers())
        assert buffers and all(b.device.type == device for b in buffers.values())
        assert state.finished_A.dtype == torch.float32 and state.complement is None or state.complement.dtype == torch.float32
    name = next(iter(targets(model)))
    assert protected_basis(model, name).device.type == device


def test_delete_adapter_removes_its_state():
    model, batches, _ = wrap("llava")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    begin_task(model, batches[:2])
    end_task(model, batches[:2])
    model.delete_adapter("default")
    for module in targets(model).values():
        assert "default" not in module.keeplora_state


def test_merge_into_a_low_precision_weight_is_what_the_branch_avoids():
    """The reason for the default: merged into bfloat16 weights, a small update loses most of itself and its protection."""
    model, batches, _ = wrap("llava", dtype=torch.bfloat16, finished_tasks="merge")
    originals = {n: m.get_base_layer().weight.detach().clone() for n, m in targets(model).items()}
    begin_task(model, batches[:2])
    protected = {n: protected_basis(model, n).float() for n in targets(model)}
    learn(model, batches[:2])
    end_task(model, batches[:2])
    inside_share = []
    for name, module in targets(model).items():
        written = module.get_base_layer().weight.float() - originals[name].float()
        if written.norm() > 0:
            inside_share.append(((written @ protected[name]).norm() / written.norm()).item())
    assert max(inside_share) > 1e-2  # against ~1e-7 in float32 or with the branch


def test_finished_tasks_is_validated():
    with pytest.raises(ValueError, match="finished_tasks must be one of"):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], finished_tasks="sometimes")
