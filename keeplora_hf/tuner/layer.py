"""The continual state on a targeted LoRA layer: attached as its `keeplora_state` submodule (one per adapter), and the
hooks through which the finished tasks it keeps unmerged act on the layer's output."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .state import KeepLoRALayerState

STATE_ATTR = "keeplora_state"


class LayerStates(nn.ModuleDict):
    """A target's `keeplora_state`: its adapters' states, and the handles of the hooks that apply their branches,
    removed with the last state (`delete_adapter`) or the layer (`merge_and_unload`, `unload`)."""

    def __init__(self, module: LoraLayer) -> None:
        super().__init__()
        self.hooks: list[RemovableHandle] = [
            module.register_forward_pre_hook(_open_branch),
            module.register_forward_hook(_close_branch, always_call=True),
            module.get_base_layer().register_forward_hook(_add_branch),
        ]

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []


def layer_state(module: LoraLayer, adapter_name: str) -> KeepLoRALayerState:
    """The adapter's state on `module`, created (empty, on the layer's device) the first time it is asked for."""
    states = module._modules.get(STATE_ATTR)
    if states is None:
        states = module.keeplora_state = LayerStates(module)
        # PEFT's delete_adapter drops every adapter-keyed container it is told of: the state is one
        module.other_param_names = (*module.other_param_names, STATE_ATTR)  # keeping what PEFT added per layer
    if adapter_name not in states:
        states[adapter_name] = KeepLoRALayerState().to(module.get_base_layer().weight.device)
    return states[adapter_name]


def set_layer_state(module: LoraLayer, adapter_name: str, state: KeepLoRALayerState) -> None:
    """Install `state` as the adapter's state on `module` (on the layer's device)."""
    layer_state(module, adapter_name)
    module.keeplora_state[adapter_name] = state.to(module.get_base_layer().weight.device)


def has_layer_state(module: nn.Module, adapter_name: str) -> bool:
    states = module._modules.get(STATE_ATTR) if isinstance(module, LoraLayer) else None
    return states is not None and adapter_name in states


# The frozen branch of unmerged finished tasks is added where LoRA's own branch is: to the base layer's output, in
# float32 with the sum rounded once to the output dtype (under a 16-bit autocast: in that dtype, as LoRA's). Three
# hooks do it without replacing PEFT's layer classes (so every LoRA layer type works, 4-bit included): the target's
# pre-hook tells its base layer which states to apply, to which rows (none with the adapter disabled: the pre-trained
# layer; in a mixed-adapter batch each row's own adapter), the base layer's hook returns `base(x) + branch(x)` and notes
# its own dtype, and the target's hook rounds the total (base + LoRA + branch) back to that dtype.
#: the branch calls under way, by base layer: set (or cleared) by a target's pre-hook, read by its base layer's hook,
#: removed by its closing hook; `abandon_branch_calls` drops those of a forward stopped on purpose
_BRANCH_CALLS: ContextVar[dict[int, dict] | None] = ContextVar("keeplora_branch_calls", default=None)
#: the rows' adapters of a mixed-adapter batch (`forward(..., adapter_names=[...])`), for the length of that forward
_ROW_ADAPTERS: ContextVar[list[str] | None] = ContextVar("keeplora_row_adapters", default=None)
NO_TASK_WARNING = (
    "a KeepLoRA adapter is training with no task under way: its lora_A and lora_B are zero, so every gradient is zero "
    "and nothing is learned. Begin the task first: keeplora_hf.begin_task(model, loader), or train with "
    "KeepLoRATrainer / KeepLoRACallback, which do it."
)


@contextmanager
def row_adapters(adapter_names: list[str] | None) -> Iterator[None]:
    """Within it, a forward applies the finished tasks of each row's own adapter (`__base__`: none)."""
    token = _ROW_ADAPTERS.set(None if adapter_names is None else list(adapter_names))
    try:
        yield
    finally:
        _ROW_ADAPTERS.reset(token)


def _open_branch(module: LoraLayer, args: tuple) -> None:  # noqa: ARG001
    states = module.keeplora_state
    names = _ROW_ADAPTERS.get()
    if module.disable_adapters:  # the pre-trained layer: no branch
        groups = []
    elif names is None:
        _warn_if_training_without_task(module)
        groups = [(None, [states[a] for a in module.active_adapters if a in states and states[a].branched_tasks])]
    else:
        _refuse_rows_of_merged_tasks(module, names)
        groups = [
            ([row for row, name in enumerate(names) if name == adapter], [states[adapter]])
            for adapter in dict.fromkeys(names)
            if adapter in states and states[adapter].branched_tasks
        ]
    groups = [(rows, group) for rows, group in groups if group]
    calls = dict(_BRANCH_CALLS.get() or {})
    calls.pop(id(module.get_base_layer()), None)
    if groups:
        calls[id(module.get_base_layer())] = {"groups": groups, "dtype": None}
    _BRANCH_CALLS.set(calls)


def _warn_if_training_without_task(module: LoraLayer) -> None:
    if not (module.training and torch.is_grad_enabled()):
        return
    for adapter in module.active_adapters:
        state = module.keeplora_state[adapter] if adapter in module.keeplora_state else None
        if state is not None and not state.task_open and module.lora_B[adapter].weight.requires_grad:
            warnings.warn(NO_TASK_WARNING, stacklevel=2)
            return


def _refuse_rows_of_merged_tasks(module: LoraLayer, names: list[str]) -> None:
    """Tasks merged into the base weight act on every row: a mixed batch can only ask for that adapter."""
    for adapter, state in module.keeplora_state.items():
        if state.merged_tasks and any(name != adapter for name in names):
            raise ValueError(
                f"adapter_names mixes adapters, but {adapter!r} has {state.merged_tasks} finished tasks merged into the "
                "base weight of this layer, which every row would get. Use finished_tasks='branch' for adapters served "
                "in mixed batches."
            )


def _add_branch(base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    call = (_BRANCH_CALLS.get() or {}).get(id(base))
    if call is None:
        return output
    call["dtype"] = output.dtype
    groups = call["groups"]
    if groups[0][0] is None:  # every row
        return _with_branches(groups[0][1], args[0], output)
    total = None
    for rows, states in groups:  # a mixed-adapter batch: each group of rows gets its own adapter's branch
        index = torch.tensor(rows, device=output.device)
        summed = _with_branches(states, args[0][index], output[index])
        total = output.to(summed.dtype) if total is None else total
        total = total.index_copy(0, index, summed)
    return total


def _with_branches(states: list[KeepLoRALayerState], x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`output` plus the states' branches on `x` (see `FrozenBranch`: float32 outside autocast, `output`'s dtype under
    a 16-bit autocast); the target's closing hook rounds the total to the base layer's dtype."""
    for state in states:
        output = state.add_branch(x, output)
    return output


def _close_branch(module: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    calls = dict(_BRANCH_CALLS.get() or {})
    call = calls.pop(id(module.get_base_layer()), None)
    _BRANCH_CALLS.set(calls)
    if call is None or call["dtype"] is None:
        return output
    return output.to(call["dtype"])


def abandon_branch_calls() -> None:
    """Forget the branch calls of forwards stopped on purpose before their targets finished (the statistics passes'
    early stop), which no closing hook saw."""
    _BRANCH_CALLS.set(None)


#: KeepLoRA's own hooks on a target and its base layer (the truth check of `tuner/truth.py` ignores them)
BRANCH_HOOKS = (_open_branch, _add_branch, _close_branch)
