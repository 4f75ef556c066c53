"""Bad input gets a clear error, and nothing already merged or saved is changed by it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from keeplora_hf.tuner.state_io import state_checksum

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, protected_basis
from keeplora_hf.models import build_tiny
from peft import PeftModel, get_peft_model

from keeplora_setups import outputs, targets, wrap


def test_unknown_target_modules():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(build_tiny("llava").model, KeepLoRAConfig(r=4, target_modules=["no_such_proj"]))


def test_non_linear_target_is_named():
    tiny = build_tiny("clip")
    with pytest.raises(ValueError, match=r"'vision_model.embeddings.patch_embedding' is Conv2d"):
        get_peft_model(tiny.model, KeepLoRAConfig(r=4, target_modules=["patch_embedding"]))


def test_residual_smaller_than_rank_warns_and_stays_exact():
    model, batches, _ = wrap("llava", principal_energy=1.0)  # every direction of a full-rank weight is protected
    with pytest.warns(UserWarning, match="residual subspace smaller than r"):
        begin_task(model, batches)
    for name, module in targets(model).items():
        lora_A = module.lora_A["default"].weight
        assert (lora_A @ protected_basis(model, name)).abs().max() < 1e-5


def test_task_order_is_enforced():
    model, batches, _ = wrap("llava")
    with pytest.raises(RuntimeError, match="end_task called before begin_task"):
        end_task(model, batches)
    begin_task(model, batches)
    with pytest.raises(RuntimeError, match="already under way"):
        begin_task(model, batches)


def test_batches_without_labels_are_explained():
    model, batches, _ = wrap("llava")
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="returned no loss"):
        begin_task(model, unlabeled)
    assert not model.base_model.progress("default").in_task


def test_failed_end_task_changes_nothing():
    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model(**batches[0]).loss.backward()
    optimizer.step()
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in targets(model).items()}
    before = outputs(model, batches[0])

    def broken():
        yield batches[0]
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        end_task(model, broken(), max_batches=3)
    assert model.base_model.progress("default").in_task
    assert all(torch.equal(m.get_base_layer().weight, weights[n]) for n, m in targets(model).items())
    assert all(m.keeplora_state["default"].tasks == [] for m in targets(model).values())
    assert torch.equal(outputs(model, batches[0]), before)
    end_task(model, batches)  # the task can still be finished properly
    assert model.base_model.progress("default").task_index == 1


def test_mismatched_saved_state_is_refused_before_touching_the_base(tmp_path):
    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    end_task(model, batches)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("keeplora_state.task0.lora_A"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    tensors["keeplora_state.checksum"] = state_checksum(tensors)  # a crafted file, not a corrupted one
    save_file(tensors, path)

    base = build_tiny("llava").model
    # the Linear objects survive wrapping as LoRA base layers, so their weights can be checked afterwards
    pristine = {m: m.weight.detach().clone() for m in base.modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(m.weight, weight) for m, weight in pristine.items())
