"""Teach `peft` the KEEPLORA peft type, so configs, `get_peft_model` and `PeftModel.from_pretrained` know it.

`peft.utils.PeftType` is a closed `str` enum and `register_peft_method` only accepts its members, so the member is
added here before registering. This is the one place that touches `peft` internals.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

KEEPLORA_NAME = "keeplora"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


KEEPLORA_PEFT_TYPE = _add_peft_type_member(KEEPLORA_NAME.upper())


def register_keeplora() -> None:
    """Register config and tuner classes with `peft` (idempotent, so re-imports are harmless)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import KeepLoRAConfig
    from .model import KeepLoRAModel

    if KEEPLORA_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=KEEPLORA_NAME, config_cls=KeepLoRAConfig, model_cls=KeepLoRAModel, prefix="lora_")
