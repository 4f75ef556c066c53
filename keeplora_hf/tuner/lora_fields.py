"""Which `LoraConfig` fields a `KeepLoRAConfig` accepts: an allow-list, so that a field a later `peft` release adds is
refused (at any value but its default) until a test verifies it with KeepLoRA++.

Every field below is exercised with KeepLoRA in tests/tuner/test_lora_fields.py (the guarantee after a task, and a
save -> load round trip), except the bookkeeping ones that PEFT itself sets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

from peft import LoraConfig

#: fields PEFT fills in itself (type, versions, where the base came from) or that select modules only
BOOKKEEPING_FIELDS = frozenset(
    {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
#: fields verified with KeepLoRA++ at any valid value (tests/tuner/test_lora_fields.py)
VERIFIED_FIELDS = frozenset(
    {
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "lora_dropout",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        # read only together with a field refused below (megatron_config, use_qalora): inert on their own
        "megatron_core",
        "qalora_group_size",
    }
)
#: fields verified only at one value (checked with their own message in `KeepLoRAConfig.__post_init__`)
FIXED_FIELDS = frozenset({"init_lora_weights", "bias"})

#: why the best-known refused fields break the method (any other non-default field gets the generic reason)
REFUSAL_REASONS = {
    "use_dora": "DoRA rescales the whole weight, so a finished task is no longer exactly s * B @ A",
    "lora_bias": "a trained bias changes the model outside the protected-subspace guarantee",
    "use_rslora": "rsLoRA's alpha / sqrt(r) scale would replace the depth scale KeepLoRA++ folds into each layer",
    "target_parameters": "KeepLoRA targets nn.Linear modules, whose input side it protects",
    "trainable_token_indices": "trained embedding rows change the model outside any protected subspace, and no "
    "export could carry them",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens, so a task whose batches "
    "lack them learns nothing and its statistics are of the wrong function",
    "kasa_config": "KaSA rewrites the base weights at wrapping, the weights the principal subspace is computed from",
    "loftq_config": "LoftQ rewrites the base weights the principal subspace is computed from",
    "eva_config": "EVA chooses A from activations; begin_task chooses A itself",
    "corda_config": "CorDA rewrites the base weights the principal subspace is computed from",
    "lora_ga_config": "LoRA-GA rewrites the base weights the principal subspace is computed from",
    "layer_replication": "replicated layers share base weights, so one layer's merge would change another's",
    "fan_in_fan_out": "KeepLoRA targets nn.Linear layers, whose weights are stored (out, in)",
}


def unverified_fields(config: LoraConfig, method_fields: Collection[str]) -> dict[str, Any]:
    """The fields of `config` that neither the method declares (`method_fields`) nor the allow-list names, whose value
    is not their default: every field `LoraConfig` has or will have."""
    allowed = BOOKKEEPING_FIELDS | VERIFIED_FIELDS | FIXED_FIELDS | set(method_fields)
    found = {}
    for spec in dataclasses.fields(config):
        if spec.name in allowed:
            continue
        value = getattr(config, spec.name)
        if value != _default(spec):
            found[spec.name] = value
    return found


def refuse_unverified_fields(config: LoraConfig, method_fields: Collection[str]) -> None:
    """Raise naming every non-default `LoraConfig` field that KeepLoRA++ has not verified, and why."""
    found = unverified_fields(config, method_fields)
    if not found:
        return
    lines = [
        f"{name}={value!r}: {REFUSAL_REASONS.get(name, 'not verified with KeepLoRA++ (a LoraConfig field it does not know)')}"
        for name, value in found.items()
    ]
    raise ValueError(
        f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} not supported by KeepLoRA; leave "
        f"{'it' if len(found) == 1 else 'them'} at the default. " + "; ".join(lines)
    )


def check_ranks_and_alphas(config: LoraConfig) -> None:
    """`r` and every `rank_pattern` value must be positive integers, `lora_alpha` and every `alpha_pattern` value
    positive finite numbers (a layer with alpha 0 or NaN learns nothing, or NaN). Checked before `LoraConfig`'s own
    checks, which fail on these with a raw TypeError."""
    if not is_integer(config.r, 1):
        raise ValueError(f"r must be a positive integer, got {config.r!r}")
    if not is_positive_number(config.lora_alpha):
        raise ValueError(f"lora_alpha must be a positive number, got {config.lora_alpha!r}")
    for key, rank in (config.rank_pattern or {}).items():
        if not is_integer(rank, 1):
            raise ValueError(f"rank_pattern[{key!r}] must be a positive integer (a rank), got {rank!r}")
    for key, alpha in (config.alpha_pattern or {}).items():
        if not is_positive_number(alpha):
            raise ValueError(f"alpha_pattern[{key!r}] must be a positive number, as lora_alpha is, got {alpha!r}")


def is_integer(value: object, minimum: int) -> bool:
    """An integer (a bool is not one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_positive_number(value: object) -> bool:
    """A finite number above 0 (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None
