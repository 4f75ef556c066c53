"""The distributed set-ups the recipes refuse (DeepSpeed ZeRO-3, FSDP1), checked before loading; FSDP2 works."""

from __future__ import annotations

import json
import os

from transformers import TrainingArguments

__all__ = ["refuse_unsupported_sharding"]


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


def _fsdp_version(training: TrainingArguments | None) -> int | None:
    """The FSDP version that will shard the weights (None without FSDP sharding), from the arguments or, before
    they exist, from what `accelerate launch` put in the environment."""
    if training is not None and training.fsdp:
        return int((training.fsdp_config or {}).get("version", 2))  # transformers' default
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if os.environ.get("FSDP_SHARDING_STRATEGY", "").upper() in ("NO_SHARD", "3"):
            return None
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default
    return None


def refuse_unsupported_sharding(training: TrainingArguments | None = None) -> None:
    """Stop at once, with the reason, under DeepSpeed ZeRO-3 or FSDP1 parameter sharding.

    KeepLoRA's subspace computations (the principal basis of each pre-trained weight, writing `A`, merging a task)
    need each target's whole weight once per task. Under FSDP2 every weight is a `DTensor`, gathered one layer at a
    time (`keeplora_hf.sharding`); FSDP1's flat parameters and ZeRO-3's partitions would need their own gathering,
    which is not implemented. DDP, ZeRO-2 and FSDP2 work. Without `training`, only what `accelerate launch` put in
    the environment is checked (before `TrainingArguments` sets DeepSpeed up).
    """
    if _deepspeed_stage(training) == 3:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 shards every weight across ranks, but KeepLoRA's subspace computations need each "
            "target's whole weight; gathering ZeRO-3 partitions (deepspeed.zero.GatheredParameters) is not "
            "implemented. Use recipes/accelerate_configs/fsdp2.yaml to shard the weights, or deepspeed_zero2.yaml / "
            "multi_gpu.yaml when the model fits one GPU."
        )
    if _fsdp_version(training) == 1:
        raise NotImplementedError(
            "FSDP1 shards the weights as flat parameters, which KeepLoRA cannot gather layer by layer; FSDP2 "
            "(fsdp_version: 2) is supported: use recipes/accelerate_configs/fsdp2.yaml."
        )
