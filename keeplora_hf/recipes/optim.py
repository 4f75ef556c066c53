"""The recipes' optimizer: the projector (peft's modules_to_save) may learn at its own rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

__all__ = ["projector_optimizer"]


class _SeparateLearningRate:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=...)`: the projector gets its own learning rate.

    The Trainer calls `factory()(model, **kwargs)`; the optimizer is the one `TrainingArguments.optim` names, with
    four groups (adapter / projector x decay / no decay), so the scheduler scales both learning rates alike.
    """

    def __init__(self, training: TrainingArguments, projector_lr: float) -> None:
        self.training = training
        self.projector_lr = projector_lr

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return self.build

    def build(self, model: nn.Module, **_: Any) -> torch.optim.Optimizer:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.training, model)
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            projector = "modules_to_save" in name
            decay = parameter.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((projector, decay), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.training.weight_decay if decay else 0.0,
                "lr": self.projector_lr if projector else self.training.learning_rate,
            }
            for (projector, decay), params in sorted(groups.items())
        ]
        return optimizer_cls(param_groups, **kwargs)


def projector_optimizer(training: TrainingArguments, projector_lr: float | None) -> dict[str, Any]:
    """Trainer keyword arguments that give the projector (modules_to_save) its own learning rate, or nothing."""
    if projector_lr is None or projector_lr == training.learning_rate:
        return {}
    return {"optimizer_cls_and_kwargs": (_SeparateLearningRate(training, projector_lr), {})}
