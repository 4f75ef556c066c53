"""The continual state on a targeted LoRA layer: attached as its `keeplora_state` submodule (one per adapter), and the
hooks through which the finished tasks it keeps unmerged act on the layer's output."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .finished import TASK_DTYPE
from .state import KeepLoRALayerState

STATE_ATTR = "keeplora_state"


def layer_state(module: LoraLayer, adapter_name: str) -> KeepLoRALayerState:
    """The adapter's state on `module`, created (empty, on the layer's device) the first time it is asked for."""
    states = module._modules.get(STATE_ATTR)
    if states is None:
        states = module.keeplora_state = nn.ModuleDict()
        # PEFT's delete_adapter drops every adapter-keyed container it is told of: the state is one
        module.other_param_names = (*type(module).other_param_names, STATE_ATTR)
        module.register_forward_pre_hook(_open_branch)
        module.register_forward_hook(_close_branch, always_call=True)
        module.get_base_layer().register_forward_hook(_add_branch)
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
# float32, with the sum rounded once to the output dtype. Three hooks do it without replacing PEFT's layer classes (so
# every LoRA layer type works, 4-bit included): the target's pre-hook tells its base layer which states to apply
# (none with the adapter disabled: the pre-trained layer), the base layer's hook returns `base(x) + branch(x)` in
# float32 and notes its own dtype, and the target's hook rounds the total (base + LoRA + branch) back to that dtype.
_BRANCH_CALL = "_keeplora_branch_call"


def _open_branch(module: LoraLayer, args: tuple) -> None:  # noqa: ARG001
    if module.disable_adapters:
        return
    states = [module.keeplora_state[a] for a in module.active_adapters if a in module.keeplora_state]
    states = [s for s in states if s.branched_tasks]
    if states:
        module.get_base_layer().__dict__[_BRANCH_CALL] = {"states": states, "dtype": None}


def _add_branch(base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    call = base.__dict__.get(_BRANCH_CALL)
    if call is None:
        return output
    call["dtype"] = output.dtype
    total = output.to(TASK_DTYPE)
    for state in call["states"]:
        total = total + state.branch(args[0])
    return total


def _close_branch(module: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    call = module.get_base_layer().__dict__.pop(_BRANCH_CALL, None)
    if call is None or call["dtype"] is None:
        return output
    return output.to(call["dtype"])
