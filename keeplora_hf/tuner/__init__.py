"""The KEEPLORA tuner, laid out like PEFT's own tuners (config, layer, model)."""

from .config import KeepLoRAConfig
from .model import KeepLoRAModel
from .registration import KEEPLORA_PEFT_TYPE, register_keeplora

register_keeplora()

__all__ = ["KEEPLORA_PEFT_TYPE", "KeepLoRAConfig", "KeepLoRAModel"]
