"""A finished task's update of one layer, as the layer state keeps it (float32, whatever the base's dtype), and the
frozen branch through which the unmerged ones act on the layer's output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: dtype of finished tasks' A and B, and of the frozen branch that applies them
TASK_DTYPE = torch.float32


@dataclass
class FinishedTask:
    """One learned task's rank-r update of a layer: `delta_W = scaling * lora_B @ lora_A` (float32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


def merged_delta(tasks: list[FinishedTask]) -> torch.Tensor:
    """The sum of the tasks' updates, in float32."""
    total = tasks[0].delta()
    for task in tasks[1:]:
        total = total + task.delta()
    return total


class FrozenBranch:
    """`sum_t s_t B_t A_t x` of a layer's unmerged tasks in float32, their factors stacked: one `A` (`R x d_in`), one
    `B`, so any number of tasks costs one pair of products. One layer scale for all tasks is applied after `B`, as
    LoRA applies it, so a task's function survives `end_task` bit for bit; otherwise each task's scale is folded into
    its columns of `B`."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scalings: list[float]) -> None:
        if len(set(scalings)) == 1:
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B, scalings[0]
        else:
            columns = torch.cat([lora_B.new_full((r,), s) for r, s in zip(ranks, scalings)])
            self.lora_A, self.lora_B, self.scaling = lora_A, lora_B * columns, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out if self.scaling is None else out.mul_(self.scaling)  # in place: not saved for backward
