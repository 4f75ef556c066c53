"""Where a target sits in depth: its layer within the transformer stack that holds it.

KeepLoRA++'s layer scale (`layer_scales`) and the analysis' depth groups count depth by this one rule.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["layer_scales", "stack_position"]

_INDEX = re.compile(r"^\d+$")


def stack_position(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """(stack, layer index, layer count) of the module `name`; None outside any stack.

    A stack is the outermost `nn.ModuleList` on the module's path, indexed by a number (so a vision tower and a
    language model are counted separately, and experts inside a layer do not count as depth).
    """
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        container_name = ".".join(parts[:i])
        container = model.get_submodule(container_name)
        if isinstance(container, nn.ModuleList) and _INDEX.match(parts[i]):
            return container_name, int(parts[i]), len(container)
    return None


def layer_scales(model: nn.Module, names: list[str], gamma: float) -> dict[str, float]:
    """KeepLoRA++'s `s_l = gamma + (1 - gamma) * l / (L - 1)` for each target, depth counted per transformer stack
    (`stack_position`). Targets outside any stack, or in a one-layer stack, get 1.0.
    """
    scales = {}
    for name in names:
        position = stack_position(model, name)
        scale = 1.0
        if position is not None and position[2] > 1:
            _, depth, count = position
            scale = gamma + (1.0 - gamma) * depth / (count - 1)
        scales[name] = scale
    return scales
