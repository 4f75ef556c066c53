"""Keeping a trained `A` in its residual subspace: re-projected after every optimizer step (`train_lora_A`)."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..sharding import assign_, full_value, is_partitioned, local_value
from .autocast import full_precision
from .layer import layer_state
from .model import LAYER_CACHE_ATTR, keeplora_layers, tuner_of
from .state_sharding import from_owner, owns, state_owners


@full_precision
def project_lora_A_(model: nn.Module) -> None:
    """Put every trainable `A` back into its residual subspace: `A <- A (I - P P^T)`.

    Called after each optimizer step, this keeps `A P = 0` exactly under any optimizer, AdamW included, where
    projecting only the gradient would not.
    """
    adapter, layers = _projected_layers(model)
    owners = state_owners(model, layers)
    with torch.no_grad():
        for name, module in layers.items():
            weight = module.lora_A[adapter].weight
            if not weight.requires_grad:
                continue
            if owners is not None:  # the state is sharded by layer: the owner projects the whole A, each rank writes
                value = full_value(weight).float()
                projected = layer_state(module, adapter).subspace().project_out(value) if owns(owners, name) else None
                assign_(weight, from_owner(projected, tuple(value.shape), torch.float32, value.device, owners[name]))
                continue
            subspace = layer_state(module, adapter).subspace()  # cached: the basis (or complement) in float32
            if is_partitioned(weight):  # ZeRO-3: gathered, projected, written back with its float32 master
                assign_(weight, subspace.project_out(full_value(weight).float()))
                continue
            lora_A = local_value(weight)  # its rows: sharded by FSDP2, each rank its own
            if lora_A.dtype == torch.float32:
                subspace.project_out_(lora_A)
            else:  # half-precision weights: project in float32, round once
                lora_A.copy_(subspace.project_out(lora_A.float()).to(lora_A.dtype))


def _projected_layers(model: nn.Module) -> tuple[str, dict[str, LoraLayer]]:
    """The active adapter and its target layers, cached on the tuner: `project_lora_A_` runs after every step."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    cache = tuner.__dict__.setdefault(LAYER_CACHE_ATTR, {})
    layers = cache.get(adapter)
    if layers is None or not all(adapter in m.lora_A for m in layers.values()):
        layers = cache[adapter] = keeplora_layers(tuner.model, adapter)
    return adapter, layers


def attach_residual_projection(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Make `optimizer.step()` re-project trainable `A`s; returns the hook handle. For custom training loops."""
    return optimizer.register_step_post_hook(lambda *_: project_lora_A_(model))
