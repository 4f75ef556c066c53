"""`KeepLoRATrainer`: a `transformers.Trainer` that runs one KeepLoRA++ task."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from transformers import Trainer

from .lifecycle import begin_task, end_task, project_lora_A_
from .statistics import LossFn, default_loss
from .tuner.model import tuner_of

logger = logging.getLogger(__name__)


class KeepLoRATrainer(Trainer):
    """Trains one task of a KeepLoRA++ sequence; everything else is the plain `Trainer`.

    - `train()` calls `begin_task` on the training data first, unless the task is already under way (a reloaded
      mid-task model) or the run resumes from one of its own checkpoints, which hold the task's `A`.
    - With `train_lora_A`, every optimizer step is followed by re-projecting `A` onto the residual subspace. The
      hook sits on the wrapped torch optimizer, so it runs once per real update: after gradient accumulation and
      clipping, and identically on every data-parallel rank.
    - `end_task()` merges the task and grows the feature memory; build a new trainer for the next task.

    `keeplora_loss_fn(model, batch)` is what the statistics passes use; it defaults to `model(**batch).loss`.
    """

    def __init__(self, *args: Any, keeplora_loss_fn: LossFn = default_loss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keeplora_loss_fn = keeplora_loss_fn
        self.keeplora_begin_seconds = 0.0

    @property
    def _keeplora(self):
        tuner = tuner_of(self.model)
        return tuner, tuner.keeplora_adapter()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        tuner, adapter = self._keeplora
        if not resume_from_checkpoint and not tuner.progress(adapter).in_task:
            start = time.perf_counter()
            loader = self._statistics_dataloader()
            begin_task(self.model, loader, max_batches=len(loader), loss_fn=self.keeplora_loss_fn)
            self.keeplora_begin_seconds = time.perf_counter() - start
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def end_task(self) -> None:
        loader = self._statistics_dataloader()
        end_task(self.model, loader, max_batches=len(loader), loss_fn=self.keeplora_loss_fn)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        tuner, adapter = self._keeplora
        config = tuner.peft_config[adapter]
        # a checkpoint reload marks every adapter weight trainable; A stays frozen unless the config says otherwise
        for module in tuner.model.modules():
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
                module.lora_A[adapter].weight.requires_grad_(config.train_lora_A)
        optimizer = super().create_optimizer(*args, **kwargs)
        if config.train_lora_A:
            optimizer.register_step_post_hook(lambda *_: project_lora_A_(self.model))
        return optimizer

    def _statistics_dataloader(self) -> DataLoader:
        """`gradient_data_ratio` of the training set, a fixed random subset drawn from `args.seed`.

        It is collated like training and sharded across data-parallel ranks, but drawn with its own generator, so
        the statistics passes leave the global RNG, and with it the training order, exactly as without them.
        """
        tuner, adapter = self._keeplora
        dataset = self.train_dataset
        size = len(dataset)
        count = max(1, math.ceil(tuner.peft_config[adapter].gradient_data_ratio * size))
        generator = torch.Generator().manual_seed(self.args.seed)
        indices = sorted(torch.randperm(size, generator=generator)[:count].tolist())
        subset = dataset.select(indices) if hasattr(dataset, "select") else Subset(dataset, indices)
        return self._get_dataloader(subset, description="KeepLoRA statistics", batch_size=self._train_batch_size)
