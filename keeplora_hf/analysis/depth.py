"""The weights an analysis intervenes on, and their depth groups: contiguous blocks of layers, shallow -> deep.

Depth is counted as KeepLoRA++'s layer scale counts it (`tuner.depth.stack_position`), each stack on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..tuner.depth import stack_position

__all__ = ["DEFAULT_GROUPS_PER_STACK", "DepthGroup", "depth_groups", "relative_depth", "target_linears"]

DEFAULT_GROUPS_PER_STACK = 4


def target_linears(model: nn.Module, targets: str | Sequence[str]) -> dict[str, nn.Linear]:
    """`nn.Linear` modules whose full name matches `targets` (a regex, `re.fullmatch` as peft does) or is listed."""
    if isinstance(targets, str):
        chosen = {n: m for n, m in model.named_modules() if re.fullmatch(targets, n)}
    else:
        wanted = set(targets)
        chosen = {n: m for n, m in model.named_modules() if n in wanted}
    linears = {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"no nn.Linear module of the model matches targets {targets!r}")
    return linears


def relative_depth(layer: float, count: int) -> float:
    """A layer's position in a stack of `count` layers: 0 for the first, 1 for the last (0 in a one-layer stack)."""
    return layer / (count - 1) if count > 1 else 0.0


@dataclass
class DepthGroup:
    """A contiguous block of layers of one stack; `depth` is its middle layer's position in the stack, in [0, 1]."""

    name: str
    targets: list[str]
    stack: str = ""
    layers: tuple[int, int] | None = None
    depth: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stack": self.stack, "layers": list(self.layers) if self.layers else None,
                "depth": self.depth, "targets": list(self.targets)}


def depth_groups(
    model: nn.Module, names: Sequence[str], groups: int | Mapping[str, str | Sequence[str]] | None = None
) -> list[DepthGroup]:
    """Split targets into depth groups, shallow -> deep, each transformer stack on its own.

    `groups=None` or an int `k`: each stack's layers in `k` (default 4) contiguous blocks as equal as possible
    (one block per layer when a stack has `k` layers or fewer). A mapping `name -> regex or list of target names`
    gives custom groups, in the mapping's order; their depth is their mean layer position where they lie in a stack.
    """
    if isinstance(groups, Mapping):
        result = []
        for group_name, selector in groups.items():
            members = [n for n in names if (re.fullmatch(selector, n) if isinstance(selector, str) else n in selector)]
            if not members:
                raise ValueError(f"depth group {group_name!r} matches no target")
            positions = [stack_position(model, n) for n in members]
            depths = [relative_depth(p[1], p[2]) for p in positions if p is not None]
            stacks = {p[0] for p in positions if p is not None}
            layers = [p[1] for p in positions if p is not None]
            result.append(DepthGroup(
                group_name, members, stack=stacks.pop() if len(stacks) == 1 else "",
                layers=(min(layers), max(layers)) if layers else None,
                depth=sum(depths) / len(depths) if depths else None,
            ))
        return result
    per_stack = DEFAULT_GROUPS_PER_STACK if groups is None else int(groups)
    if per_stack < 1:
        raise ValueError(f"groups must be at least 1, got {per_stack}")
    stacks: dict[str, tuple[int, dict[int, list[str]]]] = {}
    outside = []
    for name in names:
        position = stack_position(model, name)
        if position is None:
            outside.append(name)
            continue
        stack, index, count = position
        stacks.setdefault(stack, (count, {}))[1].setdefault(index, []).append(name)
    result = []
    for stack, (count, by_layer) in stacks.items():
        k = min(per_stack, count)
        bounds = [round(i * count / k) for i in range(k + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            members = [n for layer in range(lo, hi) for n in by_layer.get(layer, [])]
            if not members:
                continue
            label = f"{stack}[{lo}]" if hi - lo == 1 else f"{stack}[{lo}-{hi - 1}]"
            result.append(DepthGroup(label, members, stack, (lo, hi - 1), relative_depth((lo + hi - 1) / 2, count)))
    if outside:
        result.append(DepthGroup("outside stacks", outside))
    return result
