"""`KeepLoRATrainer`: the plain `transformers.Trainer` with the `KeepLoRACallback` attached, for one KeepLoRA++ task."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .callback import KeepLoRACallback
from .tuner.statistics import LossFn, default_loss


class KeepLoRATrainer(Trainer):
    """Trains one task of a KeepLoRA++ sequence; everything else is the plain `Trainer`.

    `train()` begins the task, every optimizer step keeps a trainable `A` in the residual subspace, and `end_task()`
    finishes it: all of it is `KeepLoRACallback`, which works the same with any other Trainer (TRL's `SFTTrainer`,
    a subclass of your own). Build a new trainer for the next task.

    `keeplora_loss_fn(model, batch)` is what the statistics passes use; it defaults to `model(**batch).loss`.
    """

    def __init__(self, *args: Any, keeplora_loss_fn: LossFn = default_loss, **kwargs: Any) -> None:
        self.keeplora_callback = KeepLoRACallback(loss_fn=keeplora_loss_fn)
        # first among the given callbacks: theirs see the task already begun, as with begin_task before train()
        kwargs["callbacks"] = [self.keeplora_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)

    @property
    def keeplora_begin_seconds(self) -> float:
        """Seconds the last `train()` spent in `begin_task` (reported apart from training by the runner)."""
        return self.keeplora_callback.begin_seconds

    def end_task(self) -> None:
        self.keeplora_callback.end_task(self)
