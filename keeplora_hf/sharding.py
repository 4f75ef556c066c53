"""Weights sharded across ranks (FSDP2 `fully_shard`, DeepSpeed ZeRO-3): reading one whole weight, writing a whole
value back.

The subspace math needs a target's whole weight, once and one layer at a time: `full_value` gathers it. Everything
KeepLoRA writes into a weight (LoRA's `A` at `begin_task`, zeros at a task's end, a finished task merged into the
base) is the same full value on every rank, and `update_` stores it:

- FSDP2: a parameter is a `DTensor` of which each rank holds a slice (rows, `Shard(0)`); each rank keeps its own
  slice of the value, with no communication.
- ZeRO-3: a parameter's `.data` is empty and each rank holds a flat partition; the write happens inside
  `deepspeed.zero.GatheredParameters(modifier_rank=0)`, which re-partitions rank 0's value on exit. A trainable
  parameter's float32 master copy in a live ZeRO-3 optimizer is written too, or the next step would restore the old
  value.

Plain tensors pass through unchanged, so the same code serves one process, DDP, ZeRO-2, `device_map` and both
sharded modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

Write = Callable[[torch.Tensor, torch.Tensor], object]


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3: its `.data` is empty, `ds_shape` is its real shape."""
    return hasattr(tensor, "ds_id")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether reading this tensor whole is a collective (FSDP2 `DTensor`, ZeRO-3 partition)."""
    return isinstance(tensor, DTensor) or is_partitioned(tensor)


def shape_of(tensor: torch.Tensor) -> torch.Size:
    """The tensor's whole shape, also for a ZeRO-3 partition (whose own shape is `(0,)`)."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached; gathered from every rank when sharded (a collective: every rank calls it, in the
    same order)."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    if is_partitioned(tensor):
        import deepspeed  # present whenever a parameter is partitioned

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.clone()
    return tensor.detach()


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds: its slice of a `DTensor` (a view: writes reach the parameter), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole `value` shaped as the `DTensor` `parameter` (identical on every rank: no
    communication); `value` itself for any other parameter."""
    value = value.to(parameter.device)
    if isinstance(parameter, DTensor):
        return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
    return value


def update_(parameter: torch.Tensor, value: torch.Tensor, write: Write) -> None:
    """`write(target, part)` into the parameter's storage, `part` being the piece of the whole `value` (the same on
    every rank) that `target` holds: this rank's rows of a `DTensor`, the gathered whole of a ZeRO-3 partition, else
    the parameter itself. Every rank calls it (for ZeRO-3 it is a collective)."""
    with torch.no_grad():
        if not is_partitioned(parameter):
            write(local_value(parameter.data), local_part(parameter, value))
            return
        import deepspeed

        trained = parameter.requires_grad and hasattr(parameter, "_z3_optimizer")
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            write(parameter.data, value.to(parameter.device))
            written = parameter.data.to(torch.float32, copy=True) if trained else None  # released on exit
        if written is not None:
            deepspeed.utils.safe_set_full_fp32_param(parameter, written)


def assign_(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """`parameter <- value` for a whole `value` that every rank holds alike, cast to the parameter's dtype."""
    update_(parameter, value, lambda target, part: target.copy_(part))


def zero_(parameter: torch.Tensor) -> None:
    """`parameter <- 0`, whole (every rank calls it)."""
    if is_partitioned(parameter):
        assign_(parameter, torch.zeros(shape_of(parameter), dtype=parameter.dtype, device=parameter.device))
    else:
        with torch.no_grad():
            parameter.zero_()


def has_partitioned_parameters(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned any of `model`'s parameters."""
    return any(is_partitioned(p) for p in model.parameters())


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 or ZeRO-3 manages any part of `model`: its forwards gather parameters, so they are collectives
    that every rank must run alike."""
    return any(isinstance(module, FSDPModule) for module in model.modules()) or has_partitioned_parameters(model)
