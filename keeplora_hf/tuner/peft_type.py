"""The KEEPLORA member of `peft.utils.PeftType`: the one place that touches `peft` internals.

`PeftType` is a closed `str` enum and `register_peft_method` only accepts its members, so the member is added here
before registering. tests/tuner/test_registration.py fails loudly if a `peft` release changes the enum's layout;
setup.cfg bounds `peft` to the releases tested.
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
