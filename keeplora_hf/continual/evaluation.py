"""Task metrics for the runner: callables `(model, eval_dataset) -> accuracy in [0, 1]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..tuner.statistics import move_to

IGNORE_INDEX = -100


def answer_exact_match(collator: Callable | None = None, batch_size: int = 16) -> Callable[[nn.Module, Any], float]:
    """Fraction of samples whose every answer token (label != -100) is the model's top prediction.

    With teacher forcing this equals exact match of greedy decoding stopped at the answer's end, at the cost of one
    forward pass per batch instead of a generation loop, which makes it the cheap default for short-answer VQA.
    """

    def metric(model: nn.Module, dataset: Any) -> float:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
        device = next(model.parameters()).device
        correct = total = 0
        model.eval()
        with torch.no_grad():
            for batch in loader:
                batch = move_to(batch, device)
                labels = batch["labels"]
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                predictions = logits[:, :-1].argmax(-1)
                targets = labels[:, 1:]
                answered = targets != IGNORE_INDEX
                hits = ((predictions == targets) | ~answered).all(dim=1) & answered.any(dim=1)
                correct += int(hits.sum())
                total += labels.shape[0]
        return correct / total

    return metric
