"""Register the KEEPLORA config and tuner with `peft` through its public `register_peft_method`, so configs,
`get_peft_model` and `PeftModel.from_pretrained` know them. Called once from the package `__init__`."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import KeepLoRAConfig
from .model import KeepLoRAModel
from .peft_type import KEEPLORA_NAME, KEEPLORA_PEFT_TYPE


def register_keeplora() -> None:
    """Register config and tuner classes with `peft` (idempotent, so re-imports are harmless)."""
    if KEEPLORA_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=KEEPLORA_NAME, config_cls=KeepLoRAConfig, model_cls=KeepLoRAModel, prefix="lora_")
