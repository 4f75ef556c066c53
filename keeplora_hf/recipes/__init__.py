"""What the training recipes in `recipes/` share: arguments, model loading by family, task lists, the run.

A recipe is a YAML file (plus command-line overrides) read by `parse_recipe_args` into four parts:

- `ModelArguments`, `DataArguments`, `RecipeArguments` and `transformers.TrainingArguments`, from the YAML file's
  top-level keys, parsed by `HfArgumentParser`; any of them can be overridden on the command line
  (`--learning_rate 1e-4`);
- the `keeplora:` section, a mapping onto `KeepLoRAConfig` fields (`--keeplora.r 16` overrides one);
- the `tasks:` list (and an optional `general_sets:` list), each entry naming a task's files, relative to
  `data_root` (`--data_root /data/UCIT` is the one path to set).

Modules: `arguments` (that parsing), `distributed` (the set-ups refused), `loading` (models by family, `tiny:<name>`),
`adapter` (the `keeplora:` section), `optim` (the projector's learning rate), `task_trainer` (each task's Trainer:
its own learning rate and epochs, OneCycleLR), `tasks` (task files to runner tasks), `clip` (CLIP's loss and
zero-shot metric), `run` (the whole run), `tiny_data` (the tiny configs' synthetic data).
"""

from __future__ import annotations

from .adapter import keeplora_config, seed_principal_energy
from .arguments import DataArguments, ModelArguments, RecipeArguments, RecipeConfig, parse_recipe_args
from .clip import ClassifierHeadTrainers, TaskClipCollator, clip_loss, clip_zero_shot_metric
from .distributed import loaded_whole, refuse_unsupported_sharding
from .loading import FAMILY_OF_MODEL_TYPE, PROJECTOR_MODULES, VIDEO_FAMILIES, load_clip, load_vlm
from .optim import projector_optimizer
from .run import prepare, run_chat_recipe, run_recipe
from .task_trainer import OneCycleKeepLoRATrainer, TaskTrainers
from .tasks import build_chat_tasks, build_classification_tasks, chat_collator, chat_media
from .tiny_data import TINY_DATA_WRITERS, write_tiny_classification_data, write_tiny_video_data, write_tiny_vqa_data

__all__ = [
    "ClassifierHeadTrainers",
    "DataArguments",
    "FAMILY_OF_MODEL_TYPE",
    "ModelArguments",
    "OneCycleKeepLoRATrainer",
    "PROJECTOR_MODULES",
    "RecipeArguments",
    "RecipeConfig",
    "TINY_DATA_WRITERS",
    "TaskClipCollator",
    "TaskTrainers",
    "VIDEO_FAMILIES",
    "build_chat_tasks",
    "build_classification_tasks",
    "chat_collator",
    "chat_media",
    "clip_loss",
    "clip_zero_shot_metric",
    "keeplora_config",
    "load_clip",
    "load_vlm",
    "parse_recipe_args",
    "prepare",
    "projector_optimizer",
    "loaded_whole",
    "refuse_unsupported_sharding",
    "run_chat_recipe",
    "run_recipe",
    "seed_principal_energy",
    "write_tiny_classification_data",
    "write_tiny_video_data",
    "write_tiny_vqa_data",
]
