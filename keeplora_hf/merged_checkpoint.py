"""A plain transformers checkpoint of a KeepLoRA++ model's base, with chosen targets' learned updates folded into their
weights: what `export_merged` writes whole, and the base that `export_lora(..., language_model_only=True)` writes
beside the language model's LoRA.

Every target's weight is written as one rounding of a float32 sum: either its pre-trained weight plus everything it
learned (finished tasks, merged or kept as a branch, and the task under way), as `merge_and_unload` does, or its
pre-trained weight alone, when a LoRA beside the checkpoint carries its updates. Modules trained fully
(`modules_to_save`) are written as trained.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from .sharding import is_sharded
from .tuner.finished import FinishedTask, merged_delta
from .tuner.heads import HEADS_ATTR
from .tuner.layer import layer_state
from .tuner.model import KeepLoRAModel, keeplora_layers
from .tuner.weights import is_quantized


def layer_updates(module: LoraLayer, adapter: str) -> list[FinishedTask]:
    """The layer's finished tasks, then the task under way when it has moved away from zero (float32)."""
    lora_B = module.lora_B[adapter].weight
    if is_sharded(lora_B):  # reading it would be a collective, and an export runs on the main process only
        raise ValueError(
            "export_lora / export_merged reads the live adapter, which FSDP2 or ZeRO-3 shards across ranks; export "
            "from the saved adapter instead (keeplora-hf export RUN OUT, or load it into an unsharded model)"
        )
    updates = list(layer_state(module, adapter).tasks)
    if bool(lora_B.detach().abs().sum() > 0):
        lora_A = module.lora_A[adapter].weight.detach().float()
        updates.append(FinishedTask(lora_A, lora_B.detach().float(), float(module.scaling[adapter])))
    return updates


def write_merged_checkpoint(
    tuner: KeepLoRAModel, adapter: str, directory: Path, *, folded: Collection[str]
) -> None:
    """`save_pretrained` of the base model into `directory`: the targets in `folded` with everything they learned, the
    other targets at their pre-trained weight, `modules_to_save` as trained, every other weight as it is."""
    layers = keeplora_layers(tuner.model, adapter)
    quantized = [name for name, module in layers.items() if is_quantized(module)]
    if quantized:
        raise ValueError(
            f"cannot write a merged checkpoint of a quantized base ({quantized[0]} and {len(quantized) - 1} more): "
            "load the base in bfloat16 or float32 with the saved adapter, then export"
        )
    weights = {f"{name}.weight": _target_weight(m, adapter, merge=name in folded) for name, m in layers.items()}
    state = {}
    for key, value in tuner.model.state_dict().items():
        plain = _base_key(key, adapter)
        if plain is not None:
            state[plain] = weights.get(plain, value)
    tuner.model.save_pretrained(directory, state_dict=state)


def _target_weight(module: LoraLayer, adapter: str, *, merge: bool) -> torch.Tensor:
    """The weight to write for a target: pre-trained + all it learned, or pre-trained alone, rounded once."""
    weight = module.get_base_layer().weight.detach()
    state = layer_state(module, adapter)
    updates = layer_updates(module, adapter)
    if merge:
        pending = updates[state.merged_tasks :]
        return weight if not pending else (weight.float() + merged_delta(pending).to(weight.device)).to(weight.dtype)
    if not state.merged_tasks:
        return weight
    return (weight.float() - merged_delta(updates[: state.merged_tasks]).to(weight.device)).to(weight.dtype)


#: module names under which a PEFT-wrapped model keeps adapter tensors, never written into a base checkpoint (the
#: classifier heads of KeepLoRA++cls go into their own file beside it)
ADAPTER_MARKERS = (
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "keeplora_state", HEADS_ATTR,
)


def _base_key(key: str, adapter: str) -> str | None:
    """The name `key` of the PEFT-wrapped model has in the plain base model (None: an adapter tensor, not written)."""
    module_name, _, tensor = key.rpartition(".")
    parts = module_name.split(".") if module_name else []  # a parameter of the model itself (CLIP's logit_scale)
    if any(marker in parts for marker in ADAPTER_MARKERS):
        return None
    if "original_module" in parts:  # a ModulesToSaveWrapper's frozen copy: the trained one is written instead
        return None
    if "modules_to_save" in parts:
        index = parts.index("modules_to_save")
        if parts[index + 1] != adapter:
            return None
        parts = parts[:index] + parts[index + 2 :]
    return ".".join([*[p for p in parts if p != "base_layer"], tensor])
