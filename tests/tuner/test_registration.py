"""KEEPLORA is known to `peft` as any built-in method is; if a `peft` release changes how `PeftType` is built (the one
internal that tuner/peft_type.py touches), these fail with a message saying so."""

from __future__ import annotations

import enum

from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

from keeplora_hf import KeepLoRAConfig
from keeplora_hf.models import build_tiny
from keeplora_hf.tuner import KEEPLORA_PEFT_TYPE, KeepLoRAModel

CHANGED = "peft changed its PeftType enum; update keeplora_hf/tuner/peft_type.py and the peft bound in setup.cfg"


def test_peft_type_enum_has_the_layout_peft_type_py_relies_on():
    assert issubclass(PeftType, str) and issubclass(PeftType, enum.Enum), CHANGED
    for internal in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, internal), f"{CHANGED}: no PeftType.{internal}"


def test_keeplora_is_a_full_member_of_peft_type():
    assert PeftType("KEEPLORA") is PeftType["KEEPLORA"] is PeftType.KEEPLORA is KEEPLORA_PEFT_TYPE, CHANGED
    assert KEEPLORA_PEFT_TYPE in list(PeftType), CHANGED
    assert KEEPLORA_PEFT_TYPE == "KEEPLORA" and isinstance(KEEPLORA_PEFT_TYPE, str)


def test_registered_through_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[KEEPLORA_PEFT_TYPE] is KeepLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[KEEPLORA_PEFT_TYPE] is KeepLoRAModel


def test_saved_config_and_adapter_load_back_through_peft_alone(tmp_path):
    tiny = build_tiny("llava")
    model = get_peft_model(tiny.model, KeepLoRAConfig(r=4, target_modules=tiny.language_targets))
    model.save_pretrained(str(tmp_path))
    assert isinstance(PeftConfig.from_pretrained(str(tmp_path)), KeepLoRAConfig)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, str(tmp_path))
    assert isinstance(reloaded.base_model, KeepLoRAModel)
