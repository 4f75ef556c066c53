"""Per-layer continual state of KeepLoRA++, carried by each targeted LoRA `Linear`, and its layer scale."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

STATE_ATTR = "keeplora_state"


@dataclass
class FinishedTask:
    """One learned task's rank-r update of a layer: `delta_W = scaling * lora_B @ lora_A` (float32)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


@dataclass
class KeepLoRALayerState:
    """What one layer remembers across tasks.

    `principal` (`d_in x p`) comes from the original pre-trained weight and never changes; `memory` (`d_in x m`,
    orthogonal to it) grows after each task; `tasks` is the history that rebuilds base + merged tasks exactly.
    """

    principal: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    tasks: list[FinishedTask] = field(default_factory=list)

    def protected(self) -> torch.Tensor:
        """Orthonormal `[principal, memory]`; memory is built orthogonal to the principal basis."""
        if self.principal is None:
            raise RuntimeError("the principal basis has not been computed yet: call begin_task first")
        if self.memory is None or self.memory.shape[1] == 0:
            return self.principal
        return torch.cat([self.principal, self.memory.to(self.principal.dtype)], dim=1)


def layer_state(module: LoraLayer, adapter_name: str) -> KeepLoRALayerState:
    states = module.__dict__.setdefault(STATE_ATTR, {})
    return states.setdefault(adapter_name, KeepLoRALayerState())


def has_layer_state(module: nn.Module, adapter_name: str) -> bool:
    return isinstance(module, LoraLayer) and adapter_name in module.__dict__.get(STATE_ATTR, {})


def apply_delta_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Merge a float32 update into a base weight. Used for training and for reloading, so both give the same bits."""
    weight.data.add_(delta.to(device=weight.device, dtype=weight.dtype))


_INDEX = re.compile(r"^\d+$")


def layer_scales(model: nn.Module, names: list[str], gamma: float) -> dict[str, float]:
    """KeepLoRA++'s `s_l = gamma + (1 - gamma) * l / (L - 1)` for each target, depth counted per transformer stack.

    A stack is the outermost `nn.ModuleList` on a target's path (so a vision tower and a language model are counted
    separately, and experts inside a layer do not count as depth). Targets outside any stack get 1.0.
    """
    modules = dict(model.named_modules())
    scales = {}
    for name in names:
        parts = name.split(".")
        scale = 1.0
        for i in range(1, len(parts) - 1):
            container = modules.get(".".join(parts[:i]))
            if isinstance(container, nn.ModuleList) and _INDEX.match(parts[i]):
                depth, count = int(parts[i]), len(container)
                if count > 1:
                    scale = gamma + (1.0 - gamma) * depth / (count - 1)
                break
        scales[name] = scale
    return scales
