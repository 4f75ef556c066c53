"""CLIP as a continual classifier: per-task prompt collators, the training loss and the zero-shot metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collators import ClipCollator
from ..distributed import sharded_scores
from ..tuner.statistics import move_to

__all__ = ["TaskClipCollator", "clip_loss", "clip_zero_shot_metric"]


class TaskClipCollator:
    """One `ClipCollator` per task (its own class prompts), chosen by the rows' `task` column.

    The runner passes one collator to every task's Trainer; each batch comes from one task's dataset.
    """

    def __init__(self, collators: dict[str, ClipCollator]) -> None:
        self.collators = collators

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        names = {r["task"] for r in rows}
        if len(names) != 1:
            raise ValueError(f"a CLIP batch must come from one task, got rows of {sorted(names)}")
        return self.collators[names.pop()](rows)


def clip_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """`compute_loss_func` for the Trainer: cross-entropy of image-to-class-prompt logits.

    Summed and divided by the items of the whole accumulated batch when the Trainer counts them (it then skips its
    own division by the accumulation steps), else the batch mean.
    """
    logits = outputs.logits_per_image
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def clip_zero_shot_metric(collator: ClipCollator, batch_size: int = 64) -> Callable[[nn.Module, Any], float]:
    """Zero-shot classification accuracy: each image against every class prompt of its task, argmax wins."""

    def metric(model: nn.Module, dataset: Any) -> float:
        parameter = next(model.parameters())

        def correct(rows: list[dict]) -> torch.Tensor:
            batch = move_to(collator(rows), parameter.device)
            labels = batch.pop("labels")
            batch["pixel_values"] = batch["pixel_values"].to(parameter.dtype)
            return model(**batch).logits_per_image.argmax(dim=-1) == labels

        total = sharded_scores(model, dataset, correct, batch_size=batch_size)
        return float(total[0] / total[1])

    return metric
