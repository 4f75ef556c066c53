"""Recipe arguments: a YAML file plus command-line overrides, as argument dataclasses, `keeplora:` and the task lists.

The layout of a recipe file is in the package docstring (`keeplora_hf.recipes`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..continual.run_dir import check_task_name
from .distributed import refuse_unsupported_sharding

__all__ = [
    "DataArguments", "ModelArguments", "RecipeArguments", "RecipeConfig", "TASK_TRAINING_KEYS", "parse_recipe_args",
]


@dataclass
class ModelArguments:
    """Which model, in which precision, and how its projector is trained."""

    model_name_or_path: str = field(
        metadata={"help": "A Hub id or local checkpoint, or `tiny:<llava|llava_next_video|video_llava|qwen2_vl|clip>` "
                  "for a tiny random-weight model of that architecture built from a config (no Hub)."}
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    model_family: str | None = field(
        default=None,
        metadata={"help": "Collator family: llava (LLaVA-1.5, LLaVA-NeXT), llava_next_video, video_llava, qwen2_vl "
                  "(Qwen2-VL, Qwen2.5-VL) or clip. Inferred from the checkpoint's model_type when unset."},
    )
    torch_dtype: str = field(
        default="float32", metadata={"help": "Weights' dtype at load: float32, bfloat16, float16 or auto."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2."})
    trust_remote_code: bool = field(default=False)
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base with bitsandbytes 4-bit (NF4), QLoRA-style: targets may be quantized (finished "
                  "tasks stay a float32 branch, principal bases come from the layer's dequantized weight); the "
                  "projector and lm_head stay unquantized."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Like load_in_4bit, with LLM.int8()."})
    bnb_4bit_quant_type: str = field(default="nf4")
    bnb_4bit_compute_dtype: str = field(default="bfloat16")
    quantization_skip_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Further module names kept unquantized with load_in_4bit/8bit; the projector and lm_head are "
                  "always added."},
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Qwen2-VL processors: smallest image area."})
    max_pixels: int | None = field(
        default=None, metadata={"help": "Qwen2-VL processors: largest image area (caps the visual tokens per image)."}
    )
    train_projector: bool = field(
        default=False,
        metadata={"help": "Train the vision-language projector fully (peft modules_to_save), as the reference does."},
    )
    projector_learning_rate: float | None = field(
        default=None, metadata={"help": "The projector's own learning rate (default: learning_rate)."}
    )
    projector_modules: list[str] | None = field(
        default=None, metadata={"help": "Projector module names; default multi_modal_projector (merger for Qwen2-VL)."}
    )


@dataclass
class DataArguments:
    """Where the task files are and how rows become batches."""

    data_root: str = field(default=".", metadata={"help": "Every task path is relative to this folder."})
    max_length: int = field(default=2048, metadata={"help": "Token limit of a training row (labels included)."})
    num_frames: int = field(default=8, metadata={"help": "Frames sampled uniformly from every clip (PyAV)."})
    eval_batch_size: int = field(default=8)
    max_new_tokens: int = field(
        default=32, metadata={"help": "Generation length of the eval (per task: max_new_tokens)."}
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first rows of each eval set (per task: eval_max_samples)."}
    )
    train_max_samples: int | None = field(default=None, metadata={"help": "Train on only the first rows of each task."})
    check_lengths: bool = field(
        default=True,
        metadata={"help": "Tokenise every row before training and refuse rows whose answer max_length would cut "
                  "(spread over the ranks of a distributed run)."},
    )
    tiny_data: bool = field(
        default=False, metadata={"help": "Write the small synthetic data set of the tiny configs into data_root."}
    )
    clip_prompt: str = field(default="a photo of a {}.", metadata={"help": "CLIP class prompt (per task: prompt)."})
    class_names_dir: str | None = field(
        default=None,
        metadata={"help": "Folder the tasks' class_names files are relative to (default: data_root). Written "
                  "relative in a YAML file, it is taken from that file's folder (recipes ship their class names)."},
    )


@dataclass
class RecipeArguments:
    """The run itself."""

    method_name: str = field(default="keeplora++", metadata={"help": "Method name in results.json."})
    overwrite_run: bool = field(
        default=False, metadata={"help": "Replace a run with another configuration in output_dir."}
    )
    lr_schedule: Literal["trainer", "one_cycle"] = field(
        default="trainer",
        metadata={"help": "'trainer': the Trainer's lr_scheduler_type and warmup. 'one_cycle': torch's OneCycleLR over "
                  "each task's optimizer steps with its defaults (warm-up over the first 0.3 from lr / 25, cosine down "
                  "to lr / 25e4, Adam's beta1 cycled 0.95 -> 0.85 -> 0.95), the reference MTIL schedule; "
                  "lr_scheduler_type and warmup_steps are then unused."},
    )
    classifier_heads: bool = field(
        default=False,
        metadata={"help": "KeepLoRA++cls (CLIP recipe only): each task also trains a cosine classifier head (scale 30, "
                  "initialised from the class means of its training images), whose logits are added to the task's "
                  "zero-shot logits; earlier heads stay frozen; each task is evaluated with its own head once it has "
                  "one. Saved with the adapter (keeplora_hf.tuner.heads)."},
    )


LR_SCHEDULES = ("trainer", "one_cycle")
# TrainingArguments fields a `tasks:` entry may set for itself (the reference's per-task learning rates and epochs)
TASK_TRAINING_KEYS = ("learning_rate", "num_train_epochs")
SECTION_KEYS = ("keeplora", "tasks", "general_sets")


@dataclass
class RecipeConfig:
    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    training: TrainingArguments
    keeplora: dict[str, Any]
    tasks: list[dict[str, Any]]
    general_sets: list[dict[str, Any]]
    source: str

    def describe(self) -> dict[str, Any]:
        """What decides the run's results (for run.json): not where it is written."""
        return json.loads(json.dumps({
            "model": dataclasses.asdict(self.model),
            "data": {k: v for k, v in dataclasses.asdict(self.data).items() if k != "check_lengths"},
            "lr_schedule": self.recipe.lr_schedule,
            **({"classifier_heads": True} if self.recipe.classifier_heads else {}),  # runs without heads as before
            "keeplora": self.keeplora,
            "tasks": self.tasks,
            "general_sets": self.general_sets,
        }, default=str))

    def task_training(self) -> dict[str, dict[str, float]]:
        """Each task's own TrainingArguments values (`TASK_TRAINING_KEYS` its `tasks:` entry sets), by task name."""
        return {t["name"]: {k: t[k] for k in TASK_TRAINING_KEYS if k in t} for t in self.tasks}


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_task_training(task: dict[str, Any], config_path: str | None) -> None:
    """A task's own learning_rate / num_train_epochs: positive numbers, refused with the file, task and field named."""
    for key in TASK_TRAINING_KEYS:
        if key not in task:
            continue
        value = task[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
            raise ValueError(
                f"{config_path}: task {task['name']!r}: {key} must be a positive number, got {value!r}{hint}"
            )


def parse_recipe_args(argv: Sequence[str] | None = None) -> RecipeConfig:
    """`script.py CONFIG.yaml [--key value ...] [--keeplora.field value ...]` -> a `RecipeConfig`.

    YAML keys become the argument parser's defaults, so command-line flags override them with the parser's own
    type conversion; unknown keys are refused, naming the file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = argv.pop(0)
    elif "--config" in argv:
        position = argv.index("--config")
        config_path = argv[position + 1]
        del argv[position : position + 2]
    values: dict[str, Any] = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"recipe config {config_path} not found")
        with open(config_path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{config_path}: not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: a recipe config must be a YAML mapping")
        names_dir = values.get("class_names_dir")
        if isinstance(names_dir, str) and not os.path.isabs(names_dir):
            values["class_names_dir"] = os.path.join(os.path.dirname(os.path.abspath(config_path)), names_dir)
    sections = {key: copy.deepcopy(values.pop(key, None)) for key in SECTION_KEYS}
    keeplora = dict(sections["keeplora"] or {})
    remaining = []
    index = 0
    while index < len(argv):  # --keeplora.field value / --keeplora.field=value
        arg = argv[index]
        if arg.startswith("--keeplora."):
            name, separator, value = arg[len("--keeplora.") :].partition("=")
            if not separator:
                index += 1
                if index == len(argv):
                    raise ValueError(f"{arg} needs a value")
                value = argv[index]
            keeplora[name] = _yaml_value(value)
        else:
            remaining.append(arg)
        index += 1

    refuse_unsupported_sharding()  # from the launcher's environment, before TrainingArguments sets FSDP up
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, TrainingArguments))
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; see --help for the recipe's arguments")
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
            action.required = False
    model, data, recipe, training = parser.parse_args_into_dataclasses(args=remaining, look_for_args_file=False)
    tasks = sections["tasks"] or []
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) and t.get("name") for t in tasks):
        raise ValueError(f"{config_path}: `tasks:` must be a non-empty list of mappings, each with a `name`")
    for task in tasks:  # before any data is loaded: a name is first used as a directory after the zero-shot evaluation
        try:
            check_task_name(task["name"])
        except ValueError as error:
            raise ValueError(f"{config_path}: {error}") from None
        _check_task_training(task, config_path)
    if recipe.lr_schedule not in LR_SCHEDULES:  # a YAML value is a default, which argparse does not check
        raise ValueError(f"{config_path}: lr_schedule must be one of {LR_SCHEDULES}, got {recipe.lr_schedule!r}")
    general = sections["general_sets"] or []
    if not isinstance(general, list) or not all(isinstance(g, dict) and g.get("name") for g in general):
        raise ValueError(f"{config_path}: `general_sets:` must be a list of mappings, each with a `name`")
    if training.output_dir is None:
        raise ValueError("output_dir is not set: give it in the YAML file or as --output_dir")
    return RecipeConfig(model, data, recipe, training, keeplora, tasks, general, str(config_path))
