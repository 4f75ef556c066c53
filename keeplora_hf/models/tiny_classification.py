"""Learnable image-classification tasks for the tiny CLIP, as tensor batches: a bank of concepts, each an image
prototype and a two-word class prompt, seen by each task through its own style (a shift and a contrast of the images).

A tiny CLIP pre-trained on the bank (`pretrain_tiny_clip`) classifies a task it never trained on better than chance,
and training on a task's style helps further: the ingredients of MTIL's Transfer / Avg / Last on a CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tiny import BOS_ID, FIRST_TEXT_ID, IMAGE_SIZE, VOCAB_SIZE

__all__ = ["ConceptBank", "TinyClassificationTask", "pretrain_tiny_clip"]

_EOS_ID = VOCAB_SIZE - 1  # the tiny CLIP pools the text at its EOS id
Batch = dict[str, torch.Tensor]


@dataclass
class TinyClassificationTask:
    """One task: its training and evaluation batches (`pixel_values`, class prompts `input_ids` / `attention_mask`,
    `labels`), all holding the same class prompts."""

    name: str
    concepts: list[int]
    train: list[Batch]
    eval: list[Batch]


class ConceptBank:
    """`size` concepts drawn from `seed`: a 3 x 16 x 16 image prototype and two prompt tokens each."""

    def __init__(self, size: int = 24, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.size = size
        self.prototypes = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        self.tokens = torch.randint(FIRST_TEXT_ID, _EOS_ID, (size, 2), generator=generator)

    def prompts(self, concepts: Sequence[int]) -> Batch:
        """`[BOS, w1, w2, EOS]` for each concept."""
        rows = [[BOS_ID, *self.tokens[c].tolist(), _EOS_ID] for c in concepts]
        input_ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def images(self, concepts: torch.Tensor, style: torch.Tensor, contrast: float, noise: float,
               generator: torch.Generator) -> torch.Tensor:
        """Images of `concepts` (indices into the bank) through a task's `style` shift and `contrast`, with noise."""
        pixels = self.prototypes[concepts] * contrast + style
        return pixels + noise * torch.randn(pixels.shape, generator=generator)

    def task(
        self, name: str, concepts: Sequence[int], seed: int, *, per_class: int = 16, eval_per_class: int = 16,
        batch_size: int = 16, style: float = 1.5, noise: float = 0.8,
    ) -> TinyClassificationTask:
        """A task over `concepts` with its own style (drawn from `seed`): shuffled training batches, eval batches."""
        generator = torch.Generator().manual_seed(seed)
        shift = style * torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        contrast = float(0.5 + torch.rand((), generator=generator))
        prompts = self.prompts(concepts)
        bank = torch.tensor(list(concepts))

        def batches(count: int, shuffle: bool) -> list[Batch]:
            labels = torch.arange(len(concepts)).repeat_interleave(count)
            if shuffle:
                labels = labels[torch.randperm(len(labels), generator=generator)]
            pixels = self.images(bank[labels], shift, contrast, noise, generator)
            return [
                {"pixel_values": pixels[i : i + batch_size], "labels": labels[i : i + batch_size], **prompts}
                for i in range(0, len(labels), batch_size)
            ]

        return TinyClassificationTask(name, list(concepts), batches(per_class, True), batches(eval_per_class, False))


def pretrain_tiny_clip(model: nn.Module, bank: ConceptBank, concepts: Sequence[int], *, steps: int = 300,
                       batch_size: int = 32, seed: int = 0, lr: float = 3e-3) -> None:
    """Classification pre-training on `concepts` of the bank (against all their prompts), each image drawn through a
    random colour shift: general knowledge that a continual sequence should keep (its zero-shot accuracy on tasks it
    has not trained yet)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    known = torch.tensor(list(concepts))
    prompts = bank.prompts(known.tolist())
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, len(known), (batch_size,), generator=generator)
        style = 0.5 * torch.randn(batch_size, 3, 1, 1, generator=generator)
        contrast = float(0.5 + torch.rand((), generator=generator))
        pixels = bank.images(known[labels], style, contrast, 0.6, generator)
        logits = model(pixel_values=pixels, **prompts).logits_per_image
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
