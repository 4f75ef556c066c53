"""Tiny VLMs wrapped with KeepLoRA, shared by the tuner tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import torch

from keeplora_hf import KeepLoRAConfig
from keeplora_hf.models import build_tiny
from peft import get_peft_model


def all_targets(tiny) -> str:
    return f"({tiny.language_targets})|({tiny.vision_targets})"


def wrap(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides):
    """A tiny model under KeepLoRA with both its language and vision stacks targeted, plus its batches.

    The base is cast to `dtype` and moved to `device` before wrapping, as a user loads it; PEFT keeps the adapter
    weights in float32 whatever the base dtype, as it does for a bfloat16 checkpoint.
    """
    tiny = build_tiny(name)
    tiny.model.to(device=device, dtype=dtype)
    settings = dict(r=4, lora_alpha=8, target_modules=all_targets(tiny), principal_energy=0.6, gradient_data_ratio=1.0)
    settings.update(overrides)
    model = get_peft_model(tiny.model, KeepLoRAConfig(**settings))
    batches = [_to(tiny.make_batch(2, seed), device, dtype) for seed in range(3)]
    return model, batches, tiny


def learn(model, batches, steps: int = 3) -> None:
    """A few AdamW steps on the trainable weights (B, and A when it trains): enough to move every target."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def targets(model) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "keeplora_state")}


def _to(batch: dict, device: str, dtype: torch.dtype) -> dict:
    """A batch on `device`, its floating inputs (pixels) in the model's dtype."""
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }
