"""Where a target sits in depth: its layer within the transformer stack that holds it.

KeepLoRA++'s layer scale (`layer.layer_scales`) and the analysis' depth groups count depth by this one rule.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["stack_position"]

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
