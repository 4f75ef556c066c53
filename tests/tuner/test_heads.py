"""KeepLoRA++cls on the tiny CLIP: a cosine head per task, initialised from class means, trained with the task's LoRA,
frozen afterwards, saved with the adapter and beside an export, and bad input refused by file, task and field."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, export_lora
from keeplora_hf.export import export_merged
from keeplora_hf.data import clip_classification_loss
from keeplora_hf.models import build_tiny
from keeplora_hf.models.tiny_classification import ConceptBank
from keeplora_hf.tuner.heads import (
    HEADS_FILE,
    add_task_head,
    check_head_classes,
    load_task_heads,
    task_head,
    task_heads,
)
from peft import PeftModel, get_peft_model

from keeplora_setups import all_targets

DTYPES = [torch.float32, torch.bfloat16]


def _setup(device: str, dtype: torch.dtype):
    tiny = build_tiny("clip")
    tiny.model.to(device=device, dtype=dtype)
    config = KeepLoRAConfig(r=4, lora_alpha=1, target_modules=all_targets(tiny), gradient_data_ratio=1.0)
    bank = ConceptBank(12, seed=0)
    tasks = [bank.task(f"task {i}", [4 * i + c for c in range(4)], seed=10 + i, per_class=8, eval_per_class=8)
             for i in range(2)]
    return get_peft_model(tiny.model, config), tasks


def _on(batch: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits_per_image for b in batches])


def _accuracy(model, batches) -> float:
    labels = torch.cat([b["labels"] for b in batches])
    return float((_logits(model, batches).argmax(-1).cpu() == labels.cpu()).float().mean())


def _learn_task(model, task, device, dtype, epochs: int = 4) -> None:
    """begin_task (no head: the reference's gradient), the head from class means, LoRA and head trained, end_task."""
    train = [_on(b, device, dtype) for b in task.train]
    begin_task(model, train, loss_fn=clip_classification_loss)
    add_task_head(model, task.name, train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(epochs):
        for batch in train:
            clip_classification_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
    end_task(model, train, loss_fn=clip_classification_loss)
    task_heads(model).active = None


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_heads_learn_stay_frozen_and_reload_exactly(tmp_path, device, dtype):
    model, tasks = _setup(device, dtype)
    evals = [[_on(b, device, dtype) for b in task.eval] for task in tasks]
    zero_shot = _accuracy(model, evals[0])
    _learn_task(model, tasks[0], device, dtype)
    with task_head(model, tasks[0].name):
        learned = _accuracy(model, evals[0])
    assert learned >= 0.9 and learned > zero_shot + 0.3, (zero_shot, learned)
    first = task_heads(model).head(tasks[0].name).weight.detach().clone()

    _learn_task(model, tasks[1], device, dtype)
    heads = task_heads(model)
    assert heads.tasks == [t.name for t in tasks]
    assert torch.equal(heads.head(tasks[0].name).weight, first)  # frozen while the later task trained
    assert not heads.head(tasks[0].name).weight.requires_grad
    assert heads.head(tasks[0].name).weight.dtype == torch.float32
    with task_head(model, tasks[0].name):  # the first task, through its own head, kept (KeepLoRA keeps the rest)
        assert _accuracy(model, evals[0]) >= learned - 0.1

    model.save_pretrained(tmp_path)
    base = build_tiny("clip").model.to(device=device, dtype=dtype)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    assert task_heads(reloaded).tasks == heads.tasks
    for task, batches in zip(tasks, evals):
        with task_head(model, task.name), task_head(reloaded, task.name):
            assert torch.equal(_logits(reloaded, batches), _logits(model, batches))
    assert not any(h.weight.requires_grad for h in task_heads(reloaded).heads)


def test_a_task_under_way_reloads_with_its_head_still_training(tmp_path):
    model, tasks = _setup("cpu", torch.float32)
    train = tasks[0].train
    begin_task(model, train, loss_fn=clip_classification_loss)
    add_task_head(model, tasks[0].name, train)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("clip").model, tmp_path, is_trainable=True)
    assert task_heads(reloaded).heads[0].weight.requires_grad
    weight = task_heads(model).heads[0].weight
    model.load_adapter(str(tmp_path), "default", is_trainable=True)  # a Trainer resuming: the same parameter, in place
    assert task_heads(model).heads[0].weight is weight and weight.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_exports_carry_the_heads_in_their_own_file(tmp_path, device, dtype):
    model, tasks = _setup(device, dtype)
    _learn_task(model, tasks[0], device, dtype, epochs=1)
    batches = [_on(b, device, dtype) for b in tasks[0].eval]
    export_merged(model, tmp_path / "merged")
    export_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / HEADS_FILE).is_file()
    assert not any("keeplora_heads" in key for key in load_file(tmp_path / "merged" / "model.safetensors"))
    merged = CLIPModel.from_pretrained(tmp_path / "merged").to(device)
    load_task_heads(merged, tmp_path / "merged", expected={tasks[0].name: 4})
    with task_head(model, tasks[0].name), task_head(merged, tasks[0].name):
        expected, got = _logits(model, batches), _logits(merged, batches)
    tolerance = 1e-4 if dtype == torch.float32 else 0.5  # the merged bfloat16 weights are rounded once
    assert (expected.float() - got.float()).abs().max() < tolerance


def test_bad_heads_are_refused_by_file_task_and_field(tmp_path):
    model, tasks = _setup("cpu", torch.float32)
    add_task_head(model, tasks[0].name, tasks[0].train, activate=False)
    with pytest.raises(FileNotFoundError, match=f"{HEADS_FILE} not found"):
        load_task_heads(build_tiny("clip").model, tmp_path)
    export_lora(model, tmp_path / "export")
    path = tmp_path / "export" / HEADS_FILE
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # not backed by the file changed below

    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupt"):
        load_task_heads(build_tiny("clip").model, path.parent)
    save_file({k: v for k, v in tensors.items() if not k.endswith("task0.name")}, path)
    with pytest.raises(ValueError, match="the classifier head of task 0 has no keeplora_heads.task0.name"):
        load_task_heads(build_tiny("clip").model, path.parent)
    save_file({**tensors, "keeplora_heads.task0.weight": torch.zeros(4, 7)}, path)
    with pytest.raises(ValueError, match=r"task 'task 0' \(keeplora_heads.task0.weight\) has shape \[4, 7\]"):
        load_task_heads(build_tiny("clip").model, path.parent)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"classifier head of task 'task 0' has 4 classes, but the task has 5 class"):
        load_task_heads(build_tiny("clip").model, path.parent, expected={tasks[0].name: 5})

    # a batch of another task's prompts (5 classes) through the head of a 4-class task
    other = ConceptBank(12, seed=0).task("other", [0, 1, 2, 3, 4], seed=3, per_class=1, eval_per_class=1)
    with task_head(model, tasks[0].name), pytest.raises(ValueError, match=r"task 'task 0': its classifier head has 4"):
        _logits(model, other.eval)
    with pytest.raises(ValueError, match="no training image"):
        add_task_head(model, "sparse", [{**tasks[1].train[0], "labels": torch.zeros(16, dtype=torch.long)}])
    with pytest.raises(ValueError, match="already has a classifier head"):
        add_task_head(model, tasks[0].name, tasks[0].train)
    check_head_classes(task_heads(model), {tasks[0].name: 4, "unknown": 3}, "here")


def test_a_head_added_for_later_activation_leaves_no_earlier_head_applied():
    """The next task's begin_task scores its own class prompts: the previous task's head (other classes) is off."""
    model, tasks = _setup("cpu", torch.float32)
    add_task_head(model, tasks[0].name, tasks[0].train)
    assert task_heads(model).active == tasks[0].name
    add_task_head(model, tasks[1].name, tasks[1].train, activate=False)
    assert task_heads(model).active is None
    three_classes = {k: v[:3] if k in ("input_ids", "attention_mask") else v for k, v in tasks[1].train[0].items()}
    three_classes["labels"] = three_classes["labels"].clamp(max=2)
    clip_classification_loss(model, three_classes)  # zero-shot logits: any class count scores
