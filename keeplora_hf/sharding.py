"""Weights sharded by FSDP2 (`fully_shard`): reading one whole weight, writing a whole value into a shard.

Under FSDP2 a parameter is a `DTensor` of which each rank holds a slice (rows, `Shard(0)`). The subspace math needs a
target's whole weight, once and one layer at a time: `full_value` gathers it. Everything KeepLoRA writes into a
weight (LoRA's `A` at `begin_task`, a finished task merged into the base) is the same full value on every rank, so
`assign_` and `local_part` keep each rank's own slice of it with no communication. Plain tensors pass through unchanged,
so the same code serves one process, DDP, `device_map` and FSDP2.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; gathered from every rank when sharded (a collective: every rank calls it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds: its slice of a sharded tensor (a view: writes reach the parameter), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole `value` shaped as `parameter` (identical on every rank: no communication)."""
    value = value.to(parameter.device)
    if isinstance(parameter, DTensor):
        return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
    return value


def assign_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """`parameter <- value` for a whole `value` that every rank holds alike, cast to the parameter's dtype."""
    with torch.no_grad():
        local_value(parameter).copy_(local_part(parameter, value))


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages any part of `model` (so forward hooks gather parameters and collectives are in play)."""
    return any(isinstance(module, FSDPModule) for module in model.modules())
