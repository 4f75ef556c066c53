"""keeplora-hf: KeepLoRA++ continual learning for vision-language models, as a PEFT tuner.

Importing this package registers the KEEPLORA peft type, so `get_peft_model(model, KeepLoRAConfig(...))` and
`PeftModel.from_pretrained` work like for any PEFT method. It loads the tuner, the lifecycle, the Trainer callback and
the export only (torch, transformers, peft, safetensors); the continual runner and its data, report and plot stack
load when first used.
"""

import importlib
from typing import Any

from .export import export_lora
from .callback import KeepLoRACallback
from .tuner.lifecycle import begin_task, end_task, learned_update, protected_basis
from .tuner.projection import attach_residual_projection, project_lora_A_
from .tuner import KEEPLORA_PEFT_TYPE, KeepLoRAConfig, KeepLoRAModel

__version__ = "0.1.0"

#: names loaded on first use (PEP 562), so that `import keeplora_hf` stays the tuner, its lifecycle and callback: the
#: runner brings the data, video and plotting stack
_LAZY = {
    "ContinualRunner": ".continual",
    "ContinualTask": ".continual",
    "GeneralSet": ".continual",
    "KeepLoRATrainer": ".trainer",  # transformers.Trainer itself loads datasets and torchvision
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ContinualRunner",
    "ContinualTask",
    "GeneralSet",
    "KEEPLORA_PEFT_TYPE",
    "KeepLoRACallback",
    "KeepLoRAConfig",
    "KeepLoRAModel",
    "KeepLoRATrainer",
    "attach_residual_projection",
    "begin_task",
    "end_task",
    "export_lora",
    "learned_update",
    "project_lora_A_",
    "protected_basis",
]
