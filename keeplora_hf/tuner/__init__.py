"""The KEEPLORA tuner, laid out like PEFT's own tuners (config, layer, model), registered with `peft` on import."""

from .config import KeepLoRAConfig
from .model import KeepLoRAModel
from .peft_type import KEEPLORA_PEFT_TYPE
from .registration import register_keeplora

register_keeplora()

__all__ = ["KEEPLORA_PEFT_TYPE", "KeepLoRAConfig", "KeepLoRAModel"]
