"""PEFT LoRA and KeepLoRA++ set up the same way on a benchmark model, plus the training step they are timed on."""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model

import keeplora_hf  # noqa: F401  registers the KEEPLORA peft type
from keeplora_hf import KeepLoRAConfig, attach_residual_projection, begin_task

from models import MODELS, BenchModel

RANK = {"llava-100m": 32, "llava-1b-f32": 32, "llava-7bp-bf16": 32, "tiny-llava": 4}  # UCIT's r = 32 for the LLaVA; the tests' r = 4 for the tiny model
ALPHA = {"llava-100m": 8, "llava-1b-f32": 8, "llava-7bp-bf16": 8, "tiny-llava": 8}  # UCIT's alpha = r / 4


def bench_model(name: str, seed: int = 0, text_tokens: int | None = None) -> BenchModel:
    """The benchmark model `name`; `text_tokens` (LLaVA models only) overrides the text length of its batches."""
    return MODELS[name](seed) if text_tokens is None else MODELS[name](seed, text_tokens=text_tokens)


def lora(name: str, rank: int | None = None, text_tokens: int | None = None) -> tuple[torch.nn.Module, BenchModel]:
    bench = bench_model(name, text_tokens=text_tokens)
    config = LoraConfig(r=rank or RANK[name], lora_alpha=ALPHA[name], lora_dropout=0.0, target_modules=bench.targets)
    return get_peft_model(bench.model, config), bench


def keeplora(
    name: str, rank: int | None = None, text_tokens: int | None = None, **overrides
) -> tuple[torch.nn.Module, BenchModel]:
    bench = bench_model(name, text_tokens=text_tokens)
    settings = dict(r=rank or RANK[name], lora_alpha=ALPHA[name], lora_dropout=0.0, target_modules=bench.targets)
    settings.update(overrides)
    return get_peft_model(bench.model, KeepLoRAConfig(**settings)), bench


def batches(bench: BenchModel, count: int, offset: int = 0) -> list[dict]:
    return [bench.make_batch(bench.batch_size, offset + i) for i in range(count)]


def optimizer_for(model: torch.nn.Module, *, keeplora_trains_A: bool = False) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    if keeplora_trains_A:
        attach_residual_projection(optimizer, model)
    return optimizer


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, *, autocast: bool = False) -> float:
    """One optimizer step; `autocast`: the forward under bfloat16 autocast (the backward outside it, as the Trainer)."""
    model.train()
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def ready_keeplora(name: str, data: list[dict], **overrides) -> torch.nn.Module:
    """A KeepLoRA++ model whose first task has begun (principal bases computed, A set), ready to train."""
    model, _ = keeplora(name, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        begin_task(model, data)
    return model
