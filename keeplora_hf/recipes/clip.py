"""CLIP as a continual classifier: per-task prompt collators, the training loss, the zero-shot metric, and
KeepLoRA++cls's per-task heads in a recipe run (`ClassifierHeadTrainers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import TrainerCallback

from ..data.collators import ClipCollator
from ..distributed import sharded_scores
from ..tuner.heads import add_task_head, check_head_classes, task_head, task_heads
from ..tuner.statistics import move_to

__all__ = ["ClassifierHeadTrainers", "TaskClipCollator", "clip_loss", "clip_zero_shot_metric"]


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


def clip_zero_shot_metric(
    collator: ClipCollator, batch_size: int = 64, task: str | None = None
) -> Callable[[nn.Module, Any], float]:
    """Classification accuracy: each image against every class prompt of its task, argmax wins; zero-shot, plus the
    classifier head of `task` where the model has one (KeepLoRA++cls evaluates each task so)."""

    def metric(model: nn.Module, dataset: Any) -> float:
        parameter = next(model.parameters())

        def correct(rows: list[dict]) -> torch.Tensor:
            batch = move_to(collator(rows), parameter.device)
            labels = batch.pop("labels")
            batch["pixel_values"] = batch["pixel_values"].to(parameter.dtype)
            return model(**batch).logits_per_image.argmax(dim=-1) == labels

        with task_head(model, task):
            total = sharded_scores(model, dataset, correct, batch_size=batch_size)
        return float(total[0] / total[1])

    return metric


class ClassifierHeadTrainers:
    """KeepLoRA++cls in a recipe run: wraps the runner's per-task Trainer factory (`trainers`) so that each task gets
    its cosine head (`keeplora_hf.tuner.heads`) before its Trainer builds the optimizer that trains it.

    The head is initialised from the class means over the task's whole training set (collated by its own collator,
    `batch_size` rows at a time), as the reference's `init_head_class_mean` does, and applied from the moment
    `begin_task` has taken the task's gradient without it (the reference adds it after that step). A task that
    already has its head (a run resumed inside it) keeps the saved one. Runs on one process or under DDP.
    """

    def __init__(self, trainers: Callable[..., Trainer], collators: TaskClipCollator, batch_size: int) -> None:
        self.trainers, self.collators, self.batch_size = trainers, collators, batch_size

    def __call__(self, *, model: nn.Module, train_dataset: Any, **kwargs: Any) -> Trainer:
        names = set(train_dataset["task"])
        if len(names) != 1:
            raise ValueError(f"a task's training set must hold one task's rows, got {sorted(names)}")
        task = names.pop()
        classes = {name: len(c.prompts["input_ids"]) for name, c in self.collators.collators.items() if c.prompts}
        check_head_classes(task_heads(model), classes, "the run's adapter")
        heads = task_heads(model)
        if heads is None or heads.head(task) is None:
            add_task_head(model, task, self._batches(train_dataset, self.collators.collators[task]), activate=False)
        task_heads(model).active = None  # begin_task scores this task's prompts: no earlier task's head applies
        trainer = self.trainers(model=model, train_dataset=train_dataset, **kwargs)
        trainer.add_callback(_ActivateHead(task))
        return trainer

    def _batches(self, dataset: Any, collator: ClipCollator) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(dataset), self.batch_size):
            yield collator([dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))])


class _ActivateHead(TrainerCallback):
    """Apply the task's head once the task has begun (after `KeepLoRACallback.on_train_begin`, the Trainer's first)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        task_heads(model).active = self.task
