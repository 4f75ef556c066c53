"""`KeepLoRAModel`: LoRA layers on `nn.Linear` targets, with KeepLoRA++'s layer scales and continual state."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from ..sharding import full_value, is_partitioned, is_sharded, zero_
from .depth import layer_scales
from .factors import keep_float32_
from .heads import HEADS_KEY, head_tensors, install_heads
from .layer import STATE_ATTR, has_layer_state, layer_state, row_adapters
from .peft_type import KEEPLORA_PEFT_TYPE
from .state_io import STATE_KEY, TaskProgress, install_state, state_tensors
from .state_sharding import state_owners

LAYER_CACHE_ATTR = "_keeplora_layer_cache"  # adapter -> its target layers, for the per-step projection of A
_PREFETCHED_ATTR = "_keeplora_prefetched_state"  # adapter -> its state tensors, fetched for a main-process-only save
_FSDP_PREFIX = "_fsdp_wrapped_module."


class KeepLoRAModel(LoraModel):
    """The KEEPLORA tuner. Training-time behaviour lives in `keeplora_hf.tuner.lifecycle`; this class owns the layers.

    LoRA's layers are reused unchanged: the layer scale `s_l` is folded into each layer's `scaling`, `lora_A` is
    frozen unless `train_lora_A`, and the per-layer `KeepLoRALayerState` rides along on the layer.
    """

    prefix: str = "lora_"
    #: adapter -> where its task sequence stands (finished tasks, a task under way), saved with the adapter
    keeplora_progress: dict[str, TaskProgress]

    def __init__(self, model, config, adapter_name, **kwargs) -> None:
        self.__dict__["keeplora_progress"] = {}  # before BaseTuner.__init__ injects the first adapter
        super().__init__(model, config, adapter_name, **kwargs)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"KeepLoRA targets must be nn.Linear layers, but {current_key!r} is {type(base).__name__}. "
                "Narrow target_modules to linear projections."
            )
        if lora_config.principal_side == "left" and base.in_features != base.out_features:
            raise ValueError(
                f"principal_side='left' protects left singular vectors of each weight as input directions, which needs "
                f"square targets, but {current_key!r} is {base.out_features} x {base.in_features} (d_out x d_in). "
                "Narrow target_modules to square projections (CLIP's q, k, v, out_proj), or use principal_side='right'."
            )
        if is_sharded(base.weight):
            raise ValueError(
                f"the base weight of {current_key!r} is already sharded (FSDP2 fully_shard or DeepSpeed ZeRO-3): LoRA "
                "weights added now would not be sharded, their gradients never averaged, and each rank would learn its "
                "own update. Call get_peft_model on the whole model first, then fully_shard (or let the Trainer / "
                "accelerate prepare it)."
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
            keep_float32_(module.lora_A[adapter_name])
            keep_float32_(module.lora_B[adapter_name])
            zero_(module.lora_A[adapter_name].weight)
            zero_(module.lora_B[adapter_name].weight)
            layer_state(module, adapter_name)
        self.keeplora_progress[adapter_name] = TaskProgress()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter_name in self.peft_config:
            self.freeze_lora_A(adapter_name)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        for adapter_name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.freeze_lora_A(adapter_name)

    def freeze_lora_A(self, adapter_name: str) -> None:
        """Without `train_lora_A`, `A` stays frozen whatever marked the adapter's weights trainable (PEFT's own
        marking, `set_adapter`, a user's `set_requires_grad`). It never makes anything trainable: which adapter trains
        is PEFT's to say (`is_trainable`, `inference_mode`, the active adapter)."""
        if self.peft_config[adapter_name].train_lora_A:
            return
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.lora_A[adapter_name].weight.requires_grad_(False)

    # -- PEFT calls that would break a task under way, refused with what to do instead --------------------------

    def tasks_under_way(self) -> list[str]:
        """The adapters with a KeepLoRA task under way (between begin_task and end_task)."""
        return [name for name, progress in self.keeplora_progress.items() if progress.in_task]

    def _refuse_in_task(self, action: str, why: str, adapters: list[str] | None = None) -> None:
        busy = [a for a in self.tasks_under_way() if adapters is None or a in adapters]
        if busy:
            raise RuntimeError(
                f"{action} is refused while a KeepLoRA task of adapter {busy[0]!r} is under way: {why}. Finish the task "
                "first (keeplora_hf.end_task(model, loader), or KeepLoRACallback.end_task(trainer)); nothing was changed."
            )

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        self._refuse_in_task(
            "merging the adapter", "its update would then count twice, in the base weight and in LoRA, and end_task "
            "would keep a task the layer does not compute"
        )

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        wanted = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        leaving = [a for a in self.tasks_under_way() if a not in wanted]
        self._refuse_in_task(f"set_adapter({adapter_name!r})", "the task's adapter would stop training", leaving)
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for name in wanted:
            self.freeze_lora_A(name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._refuse_in_task(f"delete_adapter({adapter_name!r})", "the task and its state would be lost", [adapter_name])
        super().delete_adapter(adapter_name)
        self.keeplora_progress.pop(adapter_name, None)
        for module in self.model.modules():  # a layer left with no KeepLoRA state keeps no KeepLoRA hook
            states = module._modules.get(STATE_ATTR) if isinstance(module, LoraLayer) else None
            if states is not None and not len(states):
                states.remove_hooks()

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "add_weighted_adapter is not supported for KeepLoRA adapters: a weighted combination would keep neither "
            "the finished tasks kept as frozen branches nor their layer scales, nor the protected subspaces. Export "
            "each adapter as a plain LoRA (keeplora_hf.export_lora) and combine those with PEFT's LoraModel instead."
        )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """`merge_and_unload()` folds the finished tasks kept as branches into the base weights first (one rounding
        per weight), so the merged model computes what the adapter did; `unload()` drops them with the adapter."""
        if merge:
            self._check_merge_allowed()  # before the branches are folded in, so that a refusal changes nothing
            for adapter_name in adapter_names or self.active_adapters:
                for module in keeplora_layers(self.model, adapter_name).values():
                    layer_state(module, adapter_name).merge_into_base_(module, together=True)
        else:
            self._refuse_in_task("unload()", "the task under way and the continual state would be dropped")
        containers = [m.keeplora_state for m in self.model.modules() if isinstance(m, LoraLayer) and STATE_ATTR in m._modules]
        unloaded = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for states in containers:  # the base layers go back to the model without KeepLoRA's hooks
            states.remove_hooks()
        return unloaded

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """A mixed-adapter batch (`forward(..., adapter_names=[...])`) applies each row's own finished tasks."""
        with super()._enable_peft_forward_hooks(*args, **kwargs), row_adapters(kwargs.get("adapter_names")):
            yield

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
        to_return.update(head_tensors(tuner_of(model).model))  # KeepLoRA++cls's classifier heads, if it has them
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        continual = {k: v for k, v in state_dict.items() if STATE_KEY in k}
        heads = {k: v for k, v in state_dict.items() if k.startswith(f"{HEADS_KEY}.")}
        rest = {k: v for k, v in state_dict.items() if STATE_KEY not in k and k not in heads}
        load_continual_state(model, adapter_name, continual)
        if heads:  # the head of a task under way (the last one) trains on when the adapter is loaded to train
            in_task = tuner_of(model).progress(adapter_name).in_task and not config.inference_mode
            last = sum(k.endswith(".weight") for k in heads) - 1
            install_heads(tuner_of(model).model, heads, "the adapter's weights", trainable=last if in_task else None)
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
