"""The fine-tuning probe: a plain rank-r peft LoRA, trained for a few steps on some target weights only."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .eval_sets import first_item

__all__ = ["FinetuneSpec", "remove_lora", "train_lora", "training_batches"]


@dataclass
class FinetuneSpec:
    """The optional, cheap fine-tuning probe: a plain rank-`rank` LoRA trained on `train_dataset` for `steps` steps.

    `task` names the eval set whose gain is measured. `train_dataset` holds rows for `collator` (or ready batches
    when `collator` is None, then `batch_size` is not used); `loss_fn(model, batch) -> loss` defaults to `model(**batch).loss`. With `reconstruct`,
    the LoRA is also trained on every group at once, merged, and the fine-tuned model's own principal-only
    reconstruction is measured: does the task's new (specialised) knowledge survive it as well as general skills?
    """

    task: str
    train_dataset: Any
    collator: Callable | None = None
    steps: int = 30
    batch_size: int = 16
    rank: int = 8
    lora_alpha: float | None = None
    learning_rate: float = 3e-3
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    reconstruct: bool = True
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        keep = ("task", "steps", "batch_size", "rank", "lora_alpha", "learning_rate", "reconstruct", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep} | {"lora_alpha": self.alpha()}

    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.rank)


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def training_batches(spec: FinetuneSpec) -> list[Any]:
    """`spec.steps` batches, shuffled by `spec.seed` and collated once: every group trains on the same batches.

    Without a collator, `train_dataset` holds ready batches (and `batch_size` is not used).
    """
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.collator is None:
        loader = DataLoader(spec.train_dataset, batch_size=1, shuffle=True, generator=generator, collate_fn=first_item)
    else:
        loader = DataLoader(spec.train_dataset, batch_size=spec.batch_size, shuffle=True, generator=generator,
                            collate_fn=spec.collator, drop_last=len(spec.train_dataset) >= spec.batch_size)
    batches: list[Any] = []
    while len(batches) < spec.steps:
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) == spec.steps:
                break
        if len(batches) == before:
            raise ValueError("the fine-tuning set gives no batch")
    return batches


def train_lora(model: nn.Module, names: Sequence[str], spec: FinetuneSpec, batches: Sequence[Any], merge: bool) -> nn.Module:
    """Train a plain peft LoRA on `names` only; returns the peft model (merge=False) or the merged base model."""
    from peft import LoraConfig, get_peft_model

    from ..tuner.statistics import move_to

    pattern = "|".join(re.escape(n) for n in names)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha(), lora_dropout=0.0, target_modules=f"^(?:{pattern})$")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    loss_fn = spec.loss_fn or _default_loss
    device = next(model.parameters()).device
    try:
        peft_model.train()
        for batch in batches:
            loss = loss_fn(peft_model, move_to(batch, device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peft_model.eval()
    except BaseException:
        peft_model.unload()  # take the LoRA layers out again: the caller gets its model's own modules back
        raise
    if merge:
        return peft_model.merge_and_unload()
    return peft_model


def remove_lora(peft_model: nn.Module) -> nn.Module:
    return peft_model.unload()
