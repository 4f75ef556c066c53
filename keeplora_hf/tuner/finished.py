"""A finished task's update of one layer, as the layer state keeps it (float32, whatever the base's dtype)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
