"""The distributed set-up the recipes refuse (FSDP1), checked before loading; DDP, ZeRO-2/3 and FSDP2 work. Under
ZeRO-3 the model is loaded whole and partitioned by DeepSpeed at the first task's `train()`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from transformers import TrainingArguments
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

__all__ = ["loaded_whole", "refuse_unsupported_sharding"]


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
    """Stop at once, with the reason, under FSDP1 parameter sharding.

    KeepLoRA's subspace computations (the principal basis of each pre-trained weight, writing `A`, merging a task)
    need each target's whole weight once per task, one layer at a time: `keeplora_hf.sharding` gathers an FSDP2
    `DTensor` or a ZeRO-3 partition, but not FSDP1's flat parameters. Without `training`, only what `accelerate
    launch` put in the environment is checked (before `TrainingArguments` sets the distributed state up).
    """
    if _fsdp_version(training) == 1:
        raise NotImplementedError(
            "FSDP1 shards the weights as flat parameters, which KeepLoRA cannot gather layer by layer; FSDP2 "
            "(fsdp_version: 2) is supported: use recipes/accelerate_configs/fsdp2.yaml (or deepspeed_zero3.yaml)."
        )


@contextmanager
def loaded_whole(training: TrainingArguments) -> Iterator[None]:
    """Load the model whole even when the Trainer's DeepSpeed config is ZeRO-3, where transformers would partition it
    at construction (`zero.Init`). The runner evaluates the pre-trained model before the first `train()`, which is
    when DeepSpeed installs the hooks that gather partitioned weights for a forward; it partitions the model then."""
    plugin = getattr(training, "deepspeed_plugin", None)  # accelerate's, whose object transformers consults
    hf_config = getattr(plugin, "dschf", None) or getattr(training, "hf_deepspeed_config", None)
    if hf_config is None or not hf_config.is_zero3():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)
