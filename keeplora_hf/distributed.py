"""Eval sets split across the ranks of a data-parallel run: each rank takes rows `rank::world_size`, results are shared.

Used by the runner's metrics (`continual.generation`, the recipes' CLIP metric) and the recipes' up-front length
check. In a single process every function is the plain single-process computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .sharding import is_fully_sharded
from .process_group import all_reduce_sum_, rank_and_world

__all__ = ["gather_lists", "rank_and_world", "sharded_scores"]


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return items
    gathered: list[list[Any] | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def sharded_scores(
    model: nn.Module,
    dataset: Any,
    score_rows: Callable[[list[dict]], Iterable[Any]],
    *,
    batch_size: int,
    max_rows: int | None = None,
) -> torch.Tensor:
    """`[sum of scores, rows scored]` (float64) over the first `max_rows` rows of `dataset`, the same on every rank.

    Each rank scores its own rows in batches of `batch_size`, `score_rows(rows)` giving one score a row, with `model`
    in eval mode and without gradients (its mode is restored after); the sums are then all-reduced.
    """
    rank, world = rank_and_world()
    size = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    indices = range(rank, size, world)
    # a model sharded by FSDP2 or ZeRO-3 gathers its weights inside every forward, so every rank must run as many
    # batches: a rank whose rows ran out scores its last batch again and discards the result
    batches = math.ceil(math.ceil(size / world) / batch_size) if is_fully_sharded(model) else None
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = list(range(0, len(indices), batch_size))
            for start in starts:
                rows = [dataset[i] for i in indices[start : start + batch_size]]
                for value in score_rows(rows):
                    total[0] += value
                total[1] += len(rows)
            for _ in range(len(starts), batches or 0):
                list(score_rows([dataset[indices[-1] if len(indices) else 0]]))
    finally:
        model.train(was_training)
    return all_reduce_sum_(total)
