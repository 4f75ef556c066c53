"""keeplora-hf: KeepLoRA++ continual learning for vision-language models, as a PEFT tuner.

Importing this package registers the KEEPLORA peft type, so `get_peft_model(model, KeepLoRAConfig(...))` and
`PeftModel.from_pretrained` work like for any PEFT method.
"""

from .continual import ContinualRunner, ContinualTask, GeneralSet
from .export import export_lora
from .callback import KeepLoRACallback
from .lifecycle import begin_task, end_task, learned_update, protected_basis
from .projection import attach_residual_projection, project_lora_A_
from .trainer import KeepLoRATrainer
from .tuner import KEEPLORA_PEFT_TYPE, KeepLoRAConfig, KeepLoRAModel

__version__ = "0.1.0"

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
