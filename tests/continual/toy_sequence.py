"""A small continual sequence on the tiny LLaVA: each task maps a question token to an answer by its own rule.

The rules share question tokens and answer vocabulary, so learning one task disturbs the others (imported by name:
tests/ has no packages).
"""

from __future__ import annotations

import torch

from keeplora_hf import KeepLoRAConfig
from keeplora_hf.continual import ContinualTask, GeneralSet
from keeplora_hf.continual.evaluation import answer_exact_match
from keeplora_hf.models import build_tiny
from peft import get_peft_model

QUESTIONS = range(10, 22)
ANSWERS = 40


def samples(tiny, rule: int, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    out = []
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        batch = tiny.make_batch(1, seed * 1000 + i)
        item = {k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        q = int(QUESTIONS[int(torch.randint(len(QUESTIONS), (1,), generator=g))])
        item["input_ids"] = item["input_ids"].clone()
        item["input_ids"][-2], item["input_ids"][-1] = q, ANSWERS + (q * (rule + 1)) % 8
        item["labels"] = torch.full_like(item["input_ids"], -100)
        item["labels"][-1] = item["input_ids"][-1]
        out.append(item)
    return out


def toy_model(dtype: torch.dtype = torch.float32, **overrides):
    """The tiny LLaVA under KeepLoRA, its base cast to `dtype` before wrapping (as a user loads a checkpoint)."""
    tiny = build_tiny("llava")
    tiny.model.to(dtype)
    settings = dict(r=4, lora_alpha=8, target_modules=tiny.language_targets, gradient_data_ratio=0.5, principal_energy=0.3,
                    feature_energy=0.9)
    config = KeepLoRAConfig(**{**settings, **overrides})
    return get_peft_model(tiny.model, config), tiny


def toy_tasks(tiny, count: int = 2, train_size: int = 32) -> tuple[list[ContinualTask], list[GeneralSet]]:
    metric = answer_exact_match(batch_size=16)
    tasks = [
        ContinualTask(f"rule{r}", samples(tiny, r, train_size, 10 + r), samples(tiny, r, 16, 100 + r), metric)
        for r in range(count)
    ]
    general = [GeneralSet("general", samples(tiny, 7, 16, 500), metric)]
    return tasks, general
