"""Process-group helpers the tuner and the harness share: which rank this is, and a sum over data-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks (a no-op in one process), so every rank derives the same subspaces."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
