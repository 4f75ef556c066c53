"""`KeepLoRACallback`: the KeepLoRA++ task lifecycle for any `transformers.Trainer` (TRL's `SFTTrainer`, subclasses).

A callback reaches everything the lifecycle needs: the model and the training dataloader at `on_train_begin` (after
the Trainer has loaded a checkpoint to resume from, and before the first step), and every real optimizer update at
`on_optimizer_step` (after gradient accumulation and clipping, before the gradients are zeroed, on every rank alike).
So no subclass is needed, and a Trainer subclass of the user's own (a custom `compute_loss`, TRL's trainers) keeps
working unchanged.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Subset
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .tuner.lifecycle import begin_task, end_task
from .tuner.projection import project_lora_A_
from .sharding import has_partitioned_parameters
from .tuner.statistics import LossFn, default_loss
from .tuner.statistics_inputs import dataset_length
from .tuner.context import task_context
from .tuner.model import drop_prefetched_state, prefetch_continual_state, tuner_of

if TYPE_CHECKING:  # transformers.Trainer loads datasets and torchvision: not at import
    from transformers import Trainer


class KeepLoRACallback(TrainerCallback):
    """Begins a KeepLoRA++ task when training starts, keeps a trainable `A` in its residual subspace after every
    optimizer update, and finishes the task on request.

    ```python
    callback = KeepLoRACallback()
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=task, callbacks=[callback])
    trainer.train()               # begin_task on the statistics subset, then training
    callback.end_task(trainer)    # keep the task, grow the feature memory
    ```

    - `train()` begins the task on `gradient_data_ratio` of the training set, unless a task is already under way (a
      model reloaded mid-task, or a Trainer resuming from one of its own checkpoints, which hold the task's `A`).
    - With `train_lora_A`, `A` is projected back onto the residual subspace after each optimizer step; without it,
      `A` is frozen again (reloading a checkpoint marks every adapter weight trainable).
    - `loss_fn(model, batch)` is what the statistics passes use; it defaults to `model(**batch).loss`.
    """

    def __init__(self, *, loss_fn: LossFn = default_loss) -> None:
        self.loss_fn = loss_fn
        self.begin_seconds = 0.0
        self._statistics: DataLoader | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any) -> None:
        ctx = task_context(model)  # a state loaded whole into a sharded run keeps its own share (release_unowned)
        if state.global_step > 0 and not ctx.progress.in_task:
            raise RuntimeError(
                f"train() resumes a checkpoint at step {state.global_step}, but the model is not in a KeepLoRA task: "
                "the checkpoint's adapter, which holds the task under way, was not loaded (DeepSpeed restores only its "
                "own checkpoint), and beginning the task again would discard what it learned. Load it first: "
                "model.load_adapter(checkpoint, adapter_name, is_trainable=True), then train(resume_from_checkpoint="
                "checkpoint), as ContinualRunner does."
            )
        ctx.tuner.freeze_lora_A(ctx.adapter)
        if ctx.owners is not None and args.save_strategy == "best":
            raise ValueError(
                "save_strategy='best' is not supported with a fully sharded base (FSDP2, ZeRO-3): the Trainer decides "
                "to save after an evaluation, on the main process alone, where the KeepLoRA state sharded across the "
                "ranks cannot be fetched. Use save_strategy='steps' or 'epoch'"
            )
        ctx.release_unowned()
        if train_dataloader is None:
            raise ValueError("KeepLoRACallback needs the Trainer's training dataloader (transformers >= 4.40)")
        self._statistics = statistics_dataloader(train_dataloader, ctx.config.gradient_data_ratio, args)
        if not ctx.progress.in_task:
            start = time.perf_counter()
            begin_task(model, self._statistics, max_batches=len(self._statistics), loss_fn=self.loss_fn)
            self.begin_seconds = time.perf_counter() - start

    def on_optimizer_step(self, args, state, control, model=None, **kwargs: Any) -> None:
        tuner = tuner_of(model)
        if tuner.peft_config[tuner.keeplora_adapter()].train_lora_A:
            project_lora_A_(model)

    def on_step_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        self._prepare_save(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        self._prepare_save(control, model)

    @staticmethod
    def _prepare_save(control, model) -> None:
        """The Trainer saves a checkpoint after this event on the main process alone: a state sharded by layer is
        fetched onto it now, while every rank is here."""
        if control.should_save:
            prefetch_continual_state(model)

    def on_save(self, args, state, control, model=None, **kwargs: Any) -> None:
        """Under ZeRO-3 the Trainer's checkpoint holds `A`, `B` and the KeepLoRA state only if DeepSpeed gathers a
        16-bit model at save: write the whole adapter there in any case (every rank gathers, the main one writes), so
        a resumed task finds the task it was in."""
        drop_prefetched_state(model)
        if has_partitioned_parameters(model):
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_adapter_into(model, checkpoint, is_main_process=state.is_world_process_zero)

    def end_task(self, trainer_or_model: Trainer | torch.nn.Module) -> None:
        """Finish the task trained by the last `train()`, on the same statistics subset `begin_task` used."""
        if self._statistics is None:
            raise RuntimeError("end_task: this callback has not seen a train() yet, so there is no task to finish")
        model = trainer_or_model if isinstance(trainer_or_model, torch.nn.Module) else trainer_or_model.model
        end_task(model, self._statistics, max_batches=len(self._statistics), loss_fn=self.loss_fn)


def join_adapter_save(model: torch.nn.Module) -> None:
    """A rank other than the main one takes its part in `save_pretrained`'s gathers of a sharded adapter (collectives)
    and writes nothing (PEFT still creates the directory it is given: a temporary one)."""
    with tempfile.TemporaryDirectory() as unused:
        model.save_pretrained(unused, is_main_process=False)


def save_adapter_into(model: torch.nn.Module, directory: Path, *, is_main_process: bool) -> None:
    """Write the whole adapter into an existing `directory`, each file replaced only once complete. Every rank calls it
    (a sharded adapter is gathered); only the main process writes."""
    if not is_main_process:
        join_adapter_save(model)
        return
    with tempfile.TemporaryDirectory(dir=directory.parent) as staging:
        model.save_pretrained(staging)
        for file in Path(staging).iterdir():
            os.replace(file, directory / file.name)


def statistics_dataloader(train_dataloader: DataLoader, ratio: float, args: Any) -> DataLoader:
    """`ratio` of the training set, a fixed random subset drawn from `args.seed`, batched and collated like training.

    It is drawn with its own generator, so the statistics passes leave the global RNG, and with it the training
    order, exactly as without them; under several processes its batches are sharded across ranks as the Trainer
    shards its own, and the statistics are summed across ranks by the lifecycle.
    """
    dataset = train_dataloader.dataset
    size = dataset_length(dataset, "KeepLoRACallback")
    count = max(1, math.ceil(ratio * size))
    generator = torch.Generator().manual_seed(args.seed)
    indices = sorted(torch.randperm(size, generator=generator)[:count].tolist())
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=args.train_batch_size,
        collate_fn=train_dataloader.collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    state = PartialState()
    if state.num_processes == 1:
        return loader
    return prepare_data_loader(
        loader, num_processes=state.num_processes, process_index=state.process_index, put_on_device=False
    )
