"""Tiny VLMs wrapped with KeepLoRA, shared by the tuner tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import torch

from keeplora_hf import KeepLoRAConfig
from keeplora_hf.models import build_tiny
from peft import get_peft_model


def all_targets(tiny) -> str:
    return f"({tiny.language_targets})|({tiny.vision_targets})"


def wrap(name: str, **overrides):
    """A tiny model under KeepLoRA with both its language and vision stacks targeted, plus its batches."""
    tiny = build_tiny(name)
    settings = dict(r=4, lora_alpha=8, target_modules=all_targets(tiny), principal_energy=0.6, gradient_data_ratio=1.0)
    settings.update(overrides)
    model = get_peft_model(tiny.model, KeepLoRAConfig(**settings))
    batches = [tiny.make_batch(2, seed) for seed in range(3)]
    return model, batches, tiny


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def targets(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "keeplora_state")}
