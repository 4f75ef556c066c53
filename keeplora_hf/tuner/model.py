"""`KeepLoRAModel`: LoRA layers on `nn.Linear` targets, with KeepLoRA++'s layer scales and continual state."""

from __future__ import annotations


import torch
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from ..sharding import full_value, is_partitioned, zero_
from .config import KeepLoRAConfig
from .depth import layer_scales
from .layer import has_layer_state, layer_state
from .peft_type import KEEPLORA_PEFT_TYPE
from .state_io import STATE_KEY, TaskProgress, install_state, state_tensors
from .state_sharding import state_owners

LAYER_CACHE_ATTR = "_keeplora_layer_cache"  # adapter -> its target layers, for the per-step projection of A
_PREFETCHED_ATTR = "_keeplora_prefetched_state"  # adapter -> its state tensors, fetched for a main-process-only save
_FSDP_PREFIX = "_fsdp_wrapped_module."


class KeepLoRAModel(LoraModel):
    """The KEEPLORA tuner. Training-time behaviour lives in `keeplora_hf.lifecycle`; this class owns the layers.

    LoRA's layers are reused unchanged: the layer scale `s_l` is folded into each layer's `scaling`, `lora_A` is
    frozen unless `train_lora_A`, and the per-layer `KeepLoRALayerState` rides along on the layer.
    """

    prefix: str = "lora_"

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"KeepLoRA targets must be nn.Linear layers, but {current_key!r} is {type(base).__name__}. "
                "Narrow target_modules to linear projections."
            )
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self.__dict__.pop(LAYER_CACHE_ATTR, None)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
        scales = layer_scales(model, list(layers), config.layer_scale_gamma)
        for name, module in layers.items():
            module.set_scale(adapter_name, scales[name])
            zero_(module.lora_A[adapter_name].weight)
            zero_(module.lora_B[adapter_name].weight)
            layer_state(module, adapter_name)
        self.__dict__.setdefault("keeplora_progress", {})[adapter_name] = TaskProgress()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter_name in self.peft_config:
            self.freeze_lora_A(adapter_name)

    def freeze_lora_A(self, adapter_name: str) -> None:
        """`A` trains only with `train_lora_A`, whatever marked every adapter weight trainable (PEFT's own marking, a
        user's `set_requires_grad`)."""
        train = self.peft_config[adapter_name].train_lora_A
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.lora_A[adapter_name].weight.requires_grad_(train)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """`merge_and_unload()` folds the finished tasks kept as branches into the base weights first (one rounding
        per weight), so the merged model computes what the adapter did; `unload()` drops them with the adapter."""
        if merge:
            for adapter_name in adapter_names or self.active_adapters:
                for module in keeplora_layers(self.model, adapter_name).values():
                    layer_state(module, adapter_name).merge_into_base_(module, together=True)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def keeplora_adapter(self) -> str:
        """The one active adapter that a task sequence trains; KeepLoRA does not mix adapters."""
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"KeepLoRA needs exactly one active adapter, got {active}")
        return active[0]

    def progress(self, adapter_name: str) -> TaskProgress:
        return self.keeplora_progress[adapter_name]

    # -- saving and loading the continual state with the adapter ------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # sharded adapter tensors are gathered whole, never the base model, on every rank: call
        # `save_pretrained(..., is_main_process=...)` on all ranks, as PEFT and accelerate do. A ZeRO-3 partition is
        # empty in `state_dict`, so it is read from its parameter; an FSDP2 `DTensor` is gathered once filtered.
        parameters = dict(model.named_parameters())
        partitioned = [
            k for k, v in state_dict.items()
            if f".{adapter_name}." in k and not v.numel() and k in parameters and is_partitioned(parameters[k])
        ]
        state_dict = {**state_dict, **{key: full_value(parameters[key]) for key in partitioned}}
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        to_return = {key: full_value(value) for key, value in to_return.items()}
        to_return.update(continual_state_dict(model, adapter_name))
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        continual = {k: v for k, v in state_dict.items() if STATE_KEY in k}
        rest = {k: v for k, v in state_dict.items() if STATE_KEY not in k}
        load_continual_state(model, adapter_name, continual)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, rest)


def tuner_of(model: nn.Module) -> KeepLoRAModel:
    """The KeepLoRA tuner of `model`: the model itself, or the `base_model` of the PeftModel wrapping it (itself
    possibly wrapped by DistributedDataParallel and friends, as `.module`)."""
    model = getattr(model, "module", model)
    if isinstance(model, KeepLoRAModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, KeepLoRAModel):
        return tuner
    raise TypeError(f"expected a model wrapped with a KeepLoRAConfig, got {type(model).__name__}")


def keeplora_context(model: nn.Module) -> tuple[KeepLoRAModel, str, KeepLoRAConfig, dict[str, LoraLayer]]:
    """The tuner of `model`, its KeepLoRA adapter, that adapter's config and its targeted layers: what every step of a
    task works on (`model` may be wrapped by DistributedDataParallel and friends)."""
    model = getattr(model, "module", model)
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    return tuner, adapter, tuner.peft_config[adapter], keeplora_layers(model, adapter)


def keeplora_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    """The targeted layers, named as in `model.named_modules()` (FSDP's wrapper prefix removed)."""
    return {
        name.replace(_FSDP_PREFIX, ""): module
        for name, module in model.named_modules()
        if has_layer_state(module, adapter_name)
    }


def continual_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Flat tensors of the adapter's whole continual state, for safetensors (see `state_io.state_tensors`).

    When the state is sharded by layer, this fetches the bases from their owners: every rank must call it (PEFT's
    `save_pretrained(..., is_main_process=...)` on every rank), unless `prefetch_continual_state` has already done so
    for a save that only the main process runs (the Trainer's checkpoints).
    """
    tuner = tuner_of(model)
    prefetched = tuner.__dict__.get(_PREFETCHED_ATTR, {}).get(adapter_name)
    if prefetched is not None:
        return prefetched
    layers = keeplora_layers(model, adapter_name)
    return state_tensors(layers, adapter_name, tuner.progress(adapter_name), state_owners(model, layers))


def prefetch_continual_state(model: nn.Module) -> None:
    """Fetch a state sharded by layer onto the writer now, on every rank, for a save that only the main process will
    run (the Trainer saves checkpoints so); that save then writes it without communicating. Nothing to do when the
    state is not sharded. `drop_prefetched_state` frees it after the save."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    layers = keeplora_layers(model, adapter)
    owners = state_owners(model, layers)
    if owners is not None:
        tensors = state_tensors(layers, adapter, tuner.progress(adapter), owners)
        tuner.__dict__.setdefault(_PREFETCHED_ATTR, {})[adapter] = tensors


def drop_prefetched_state(model: nn.Module) -> None:
    tuner_of(model).__dict__.pop(_PREFETCHED_ATTR, None)


def load_continual_state(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Check a saved continual state against `model` and install it (see `state_io.install_state`)."""
    tuner = tuner_of(model)
    layers = keeplora_layers(model, adapter_name)
    tuner.keeplora_progress[adapter_name] = install_state(layers, adapter_name, tuner.peft_config[adapter_name], tensors)


__all__ = ["KEEPLORA_PEFT_TYPE", "KeepLoRAModel", "TaskProgress", "keeplora_layers", "tuner_of"]
