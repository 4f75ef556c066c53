"""The distributed set-ups the recipes refuse: parameter sharding (DeepSpeed ZeRO-3, FSDP), checked before loading."""

from __future__ import annotations

import json
import os

from transformers import TrainingArguments

__all__ = ["refuse_sharded_parameters"]


def _deepspeed_stage(training: TrainingArguments | None) -> int | None:
    config = None if training is None else training.deepspeed
    if isinstance(config, str) and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            with open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], encoding="utf-8") as handle:
                stage = json.load(handle).get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None
    return None


def refuse_sharded_parameters(training: TrainingArguments | None = None) -> None:
    """Stop at once, with the reason, under DeepSpeed ZeRO-3 or FSDP parameter sharding.

    KeepLoRA's subspace computations (the SVD of each pre-trained weight, the full weight gradient, the merge of
    `s * B @ A` into the weight) need each target's whole weight on every rank. Sharded parameters would need them
    gathered (`deepspeed.zero.GatheredParameters` / FSDP's `summon_full_params`) around each computation, which is
    not implemented yet. ZeRO-2 and DDP keep full weights on every rank and work. Without `training`, only what
    `accelerate launch` put in the environment is checked (before `TrainingArguments` sets DeepSpeed up).
    """
    stage = _deepspeed_stage(training)
    if stage == 3:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 shards every weight across ranks, but KeepLoRA's subspace computations (SVD of the "
            "pre-trained weights, full weight gradients, merging each task) need whole weights; gathering them with "
            "deepspeed.zero.GatheredParameters is not implemented yet. Use recipes/accelerate_configs/"
            "deepspeed_zero2.yaml or multi_gpu.yaml (a 7B model fits one 80 GB GPU in bf16)."
        )
    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "")
    sharded = (fsdp_env and strategy.upper() not in ("NO_SHARD", "3")) or bool(training is not None and training.fsdp)
    if sharded:
        raise NotImplementedError(
            "FSDP shards the weights across ranks, but KeepLoRA's subspace computations need whole weights "
            "(gathering them with summon_full_params is not implemented yet). Use recipes/accelerate_configs/"
            "multi_gpu.yaml (DDP) or deepspeed_zero2.yaml."
        )
