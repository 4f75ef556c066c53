"""A toy two-task problem: KeepLoRA++ keeps the first task where sequential LoRA forgets it."""

import torch
import torch.nn.functional as F
from torch import nn

from keeplora_hf import KeepLoRAConfig, attach_residual_projection, begin_task, end_task
from peft import LoraConfig, get_peft_model

D_IN, HIDDEN, CLASSES = 16, 32, 4


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_task(seed: int, dims: slice) -> list[dict[str, torch.Tensor]]:
    """Gaussian clusters in a 4-d slice of the input, with labels that conflict across tasks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(CLASSES, D_IN)
    centres[:, dims] = 3 * torch.randn(CLASSES, dims.stop - dims.start, generator=g)
    y = torch.arange(CLASSES).repeat(64)
    x = centres[y] + 0.3 * torch.randn(len(y), D_IN, generator=g) * (torch.arange(D_IN) >= 0)
    x[:, : dims.start] *= 0.1
    x[:, dims.stop :] *= 0.1
    return [{"x": x[i : i + 32], "y": y[i : i + 32]} for i in range(0, len(y), 32)]


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def accuracy(model: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum((model(b["x"]).argmax(-1) == b["y"]).sum().item() for b in batches) / sum(len(b["y"]) for b in batches)


def train(model: nn.Module, batches, steps: int = 150) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    attach_residual_projection(optimizer, model) if hasattr(model, "peft_config") and "KEEPLORA" in str(
        model.peft_config["default"].peft_type
    ) else None
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def hidden(model: nn.Module, batches) -> torch.Tensor:
    fc1 = model.get_base_model().fc1 if hasattr(model, "get_base_model") else model.fc1
    with torch.no_grad():
        return torch.cat([torch.relu(fc1(b["x"])) for b in batches])


def test_second_task_leaves_first_task_inputs_and_accuracy_in_place():
    task1, task2 = make_task(1, slice(0, 4)), make_task(2, slice(4, 8))
    targets = ["fc1", "fc2"]

    keep = get_peft_model(Classifier(), KeepLoRAConfig(r=4, lora_alpha=4, target_modules=targets, principal_energy=0.0, gradient_data_ratio=1.0))
    begin_task(keep, task1, loss_fn=loss_fn)
    train(keep, task1)
    end_task(keep, task1, loss_fn=loss_fn)
    keep_acc1, keep_hidden1 = accuracy(keep, task1), hidden(keep, task1)
    begin_task(keep, task2, loss_fn=loss_fn)
    train(keep, task2)
    end_task(keep, task2, loss_fn=loss_fn)

    lora = get_peft_model(Classifier(), LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    train(lora, task1)
    lora = lora.merge_and_unload()
    lora_acc1, lora_hidden1 = accuracy(lora, task1), hidden(lora, task1)
    lora = get_peft_model(lora, LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    train(lora, task2)

    assert keep_acc1 > 0.95 and lora_acc1 > 0.95  # both learned task 1
    assert accuracy(keep, task2) > 0.9 and accuracy(lora, task2) > 0.9  # both learned task 2

    # the second task moved the first task's hidden features (fc2's inputs) by a tiny fraction under KeepLoRA++
    keep_shift = ((hidden(keep, task1) - keep_hidden1).norm() / keep_hidden1.norm()).item()
    lora_shift = ((hidden(lora, task1) - lora_hidden1).norm() / lora_hidden1.norm()).item()
    assert keep_shift < 0.05, keep_shift
    assert lora_shift > 5 * keep_shift, (lora_shift, keep_shift)

    keep_after, lora_after = accuracy(keep, task1), accuracy(lora, task1)
    print(f"shift keep={keep_shift:.4f} lora={lora_shift:.4f}; task-1 acc keep={keep_after:.3f} lora={lora_after:.3f}")
    assert keep_after > 0.9, keep_after
    assert keep_after - lora_after > 0.25, (keep_after, lora_after)
