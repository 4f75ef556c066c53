"""Each task's Trainer: the task's own learning rate and epochs, the projector's rate, and OneCycleLR on request.

The reference trains every task as a run of its own, with per-task values (UCIT's last task at lr 1e-4, MLLM-DCL's
epochs 1, 3, 1, 2, 1, MTIL's epoch lists) and, for MTIL, torch's OneCycleLR. `ContinualRunner` builds one Trainer
per task through its `trainer_class`; `TaskTrainers` is that factory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer

from ..continual import ContinualTask
from ..trainer import KeepLoRATrainer
from .optim import projector_optimizer

__all__ = ["OneCycleKeepLoRATrainer", "TaskTrainers"]


class OneCycleKeepLoRATrainer(KeepLoRATrainer):
    """`KeepLoRATrainer` whose schedule is torch's `OneCycleLR` over the task's optimizer steps, with its defaults.

    Each parameter group peaks at its own learning rate (the projector's, where it has one). Momentum (Adam's beta1)
    is cycled as torch does by default, where the optimizer has one.
    """

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=num_training_steps,
                cycle_momentum=any(key in optimizer.defaults for key in ("momentum", "betas")),
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler


class TaskTrainers:
    """`ContinualRunner(trainer_class=TaskTrainers(...))`: a KeepLoRA trainer per task with that task's values.

    `overrides` maps a task name to `TrainingArguments` fields (`learning_rate`, `num_train_epochs`) that replace the
    run's for that task only; `projector_lr` gives the projector (peft's modules_to_save) its own rate in every task;
    `one_cycle` schedules each task with `OneCycleKeepLoRATrainer`. The runner hands over the task's own
    `train_dataset`, which names the task.
    """

    def __init__(
        self,
        tasks: Sequence[ContinualTask],
        overrides: Mapping[str, Mapping[str, Any]],
        *,
        projector_lr: float | None = None,
        one_cycle: bool = False,
    ) -> None:
        names = {t.name for t in tasks}
        unknown = sorted(set(name for name, values in overrides.items() if values) - names)
        if unknown:
            raise ValueError(f"training values given for tasks {unknown} that are not in the sequence {sorted(names)}")
        self.tasks = list(tasks)
        self.overrides = {name: dict(values) for name, values in overrides.items()}
        self.projector_lr = projector_lr
        self.trainer_class = OneCycleKeepLoRATrainer if one_cycle else KeepLoRATrainer

    def task_of(self, train_dataset: Any) -> ContinualTask:
        """The task whose training set `train_dataset` is (the same object the runner was given)."""
        for task in self.tasks:
            if task.train_dataset is train_dataset:
                return task
        raise ValueError("the Trainer was given a training set of no task of this sequence")

    def __call__(self, *, args: Any, train_dataset: Any, **kwargs: Any) -> Trainer:
        task = self.task_of(train_dataset)
        args = dataclasses.replace(args, **self.overrides.get(task.name, {}))
        # the projector's own rate, next to this task's learning rate
        return self.trainer_class(args=args, train_dataset=train_dataset, **kwargs,
                                  **projector_optimizer(args, self.projector_lr))
