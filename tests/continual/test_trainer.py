"""KeepLoRATrainer keeps a trained A inside the residual subspace under AdamW, accumulation and clipping."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from keeplora_hf import KeepLoRATrainer, KeepLoRAConfig, learned_update, protected_basis
from keeplora_hf.models import build_tiny
from peft import get_peft_model

from toy_sequence import toy_tasks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("train_lora_A", [False, True], ids=["frozen_A", "trained_A"])
def test_trainer_begins_trains_and_ends_a_task(tmp_path, train_lora_A, device, dtype):
    tiny = build_tiny("llava")
    tiny.model.to(device=device, dtype=dtype)
    config = KeepLoRAConfig(r=4, lora_alpha=8, target_modules=tiny.language_targets, principal_energy=0.3,
                            train_lora_A=train_lora_A)
    model = get_peft_model(tiny.model, config)
    tasks, _ = toy_tasks(tiny, count=1, train_size=32)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_grad_norm=0.5, num_train_epochs=2, learning_rate=1e-2, report_to=[], use_cpu=device == "cpu",
                             save_strategy="no", disable_tqdm=True)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}
    at_start = {}

    class SnapshotA(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after begin_task, before any step
            at_start.update({n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()})

    trainer = KeepLoRATrainer(model=model, args=args, train_dataset=tasks[0].train_dataset, callbacks=[SnapshotA()])
    weights = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    trainer.train()
    assert model.base_model.progress("default").in_task
    for name, module in layers.items():
        lora_A = module.lora_A["default"].weight
        assert (lora_A @ protected_basis(model, name)).abs().max() < 1e-5, name
        assert (not torch.equal(lora_A, at_start[name])) == train_lora_A, name
    protected = {n: protected_basis(model, n) for n in layers}
    trainer.end_task()
    assert model.base_model.progress("default").task_index == 1
    # what each layer now adds to its pre-trained weight: merged into a float32 base, a frozen branch on a bfloat16 one
    updates = {n: learned_update(model, n) for n in layers}
    worst = max((updates[n] @ protected[n].float()).norm().item() / updates[n].norm().item() for n in layers)
    assert worst <= 1e-4, worst
    for n, m in layers.items():
        written = m.get_base_layer().weight.float() - weights[n].float()
        if dtype == torch.float32:
            assert (written - updates[n]).norm() <= 1e-5 * updates[n].norm(), n
        else:
            assert torch.count_nonzero(written) == 0, n
    trained_A = [m.keeplora_state["default"].tasks[0].lora_A for m in layers.values()]
    assert all(torch.count_nonzero(a) for a in trained_A)
