"""Shared code of the training recipes in `recipes/`: arguments, model loading by family, task lists, GPU options.

A recipe is a YAML file (plus command-line overrides) read by `parse_recipe_args` into four parts:

- `ModelArguments`, `DataArguments`, `RecipeArguments` and `transformers.TrainingArguments`, from the YAML file's
  top-level keys, parsed by `HfArgumentParser`; any of them can be overridden on the command line
  (`--learning_rate 1e-4`);
- the `keeplora:` section, a mapping onto `KeepLoRAConfig` fields (`--keeplora.r 16` overrides one);
- the `tasks:` list (and an optional `general_sets:` list), each entry naming a task's files, relative to
  `data_root` (`--data_root /data/UCIT` is the one path to set).

`model_name_or_path: tiny:<name>` builds a tiny random-weight model of the same architecture from a config
(`keeplora_hf.models.build_tiny`) and its offline processor, so every recipe runs on a CPU without the Hub.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from accelerate import PartialState
from peft import PeftModel, get_peft_model
from PIL import Image
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .continual import ContinualRunner, ContinualTask, GeneralSet
from .continual.generation import NORMALIZERS, generation_metric
from .data.collators import ClipCollator, VLMChatCollator, validate_lengths
from .data.formats import (
    DataFormatError,
    load_classification,
    load_llava_json,
    load_video_qa_json,
    read_rows,
    row_name,
    source_of,
)
from .data.video import write_video
from .statistics import move_to
from .subspace import principal_basis
from .tuner.config import KeepLoRAConfig
from .tuner.layer import base_weight, layer_state, weight_fingerprint
from .tuner.model import keeplora_layers, tuner_of

logger = logging.getLogger(__name__)

__all__ = [
    "DataArguments",
    "FAMILY_OF_MODEL_TYPE",
    "ModelArguments",
    "PROJECTOR_MODULES",
    "RecipeArguments",
    "TINY_DATA_WRITERS",
    "TaskClipCollator",
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
    "projector_optimizer",
    "refuse_sharded_parameters",
    "run_chat_recipe",
    "run_recipe",
    "seed_principal_energy",
    "write_tiny_classification_data",
    "write_tiny_video_data",
    "write_tiny_vqa_data",
]

TINY_PREFIX = "tiny:"
# The collator family of each transformers model_type (`VLMChatCollator`'s model_family).
FAMILY_OF_MODEL_TYPE = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava",
    "llava_next_video": "llava_next_video",
    "video_llava": "video_llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "clip": "clip",
}
# The vision-to-language projector of each family, trained fully through peft's modules_to_save.
PROJECTOR_MODULES = {
    "llava": ["multi_modal_projector"],
    "llava_next_video": ["multi_modal_projector"],
    "video_llava": ["multi_modal_projector"],
    "qwen2_vl": ["merger"],
}
# The chat families whose recipes read clips (video_llm); the others read images unless a task names `video_folder`.
VIDEO_FAMILIES = ("video_llava", "llava_next_video")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# -- arguments -----------------------------------------------------------------------------------------------------


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


@dataclass
class RecipeArguments:
    """The run itself."""

    method_name: str = field(default="keeplora++", metadata={"help": "Method name in results.json."})
    overwrite_run: bool = field(
        default=False, metadata={"help": "Replace a run with another configuration in output_dir."}
    )


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
            "keeplora": self.keeplora,
            "tasks": self.tasks,
            "general_sets": self.general_sets,
        }, default=str))


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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

    refuse_sharded_parameters()  # from the launcher's environment, before TrainingArguments sets DeepSpeed up
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
    general = sections["general_sets"] or []
    if not isinstance(general, list) or not all(isinstance(g, dict) and g.get("name") for g in general):
        raise ValueError(f"{config_path}: `general_sets:` must be a list of mappings, each with a `name`")
    if training.output_dir is None:
        raise ValueError("output_dir is not set: give it in the YAML file or as --output_dir")
    return RecipeConfig(model, data, recipe, training, keeplora, tasks, general, str(config_path))


# -- distributed set-up and what it cannot do yet -------------------------------------------------------------------


def _deepspeed_stage(training: TrainingArguments | None) -> int | None:
    config = None if training is None else training.deepspeed
    if isinstance(config, str) and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            with open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], encoding="utf-8") as handle:
                stage = json.load(handle).get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None
    return None


def refuse_sharded_parameters(training: TrainingArguments | None = None) -> None:
    """Stop at once, with the reason, under DeepSpeed ZeRO-3 or FSDP parameter sharding.

    KeepLoRA's subspace computations (the SVD of each pre-trained weight, the full weight gradient, the merge of
    `s * B @ A` into the weight) need each target's whole weight on every rank. Sharded parameters would need them
    gathered (`deepspeed.zero.GatheredParameters` / FSDP's `summon_full_params`) around each computation, which is
    not implemented yet. ZeRO-2 and DDP keep full weights on every rank and work. Without `training`, only what
    `accelerate launch` put in the environment is checked (before `TrainingArguments` sets DeepSpeed up).
    """
    stage = _deepspeed_stage(training)
    if stage == 3:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 shards every weight across ranks, but KeepLoRA's subspace computations (SVD of the "
            "pre-trained weights, full weight gradients, merging each task) need whole weights; gathering them with "
            "deepspeed.zero.GatheredParameters is not implemented yet. Use recipes/accelerate_configs/"
            "deepspeed_zero2.yaml or multi_gpu.yaml (a 7B model fits one 80 GB GPU in bf16)."
        )
    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "")
    sharded = (fsdp_env and strategy.upper() not in ("NO_SHARD", "3")) or bool(training is not None and training.fsdp)
    if sharded:
        raise NotImplementedError(
            "FSDP shards the weights across ranks, but KeepLoRA's subspace computations need whole weights "
            "(gathering them with summon_full_params is not implemented yet). Use recipes/accelerate_configs/"
            "multi_gpu.yaml (DDP) or deepspeed_zero2.yaml."
        )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_lists(items: list[Any]) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return items
    gathered: list[list[Any] | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


# -- models --------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _quantization_config(args: ModelArguments, family: str) -> Any:
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    if args.load_in_4bit and args.load_in_8bit:
        raise ValueError("choose load_in_4bit or load_in_8bit, not both")
    from transformers import BitsAndBytesConfig

    skip = list(args.quantization_skip_modules or [])
    skip += list(args.projector_modules or PROJECTOR_MODULES.get(family, [])) + ["lm_head"]
    if args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_dtype(args.bnb_4bit_compute_dtype),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _pretrained_class(model_type: str) -> Any:
    import transformers

    specific = {
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "llava_next_video": "LlavaNextVideoForConditionalGeneration",
        "video_llava": "VideoLlavaForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    name = specific.get(model_type)
    return getattr(transformers, name) if name else transformers.AutoModelForImageTextToText


def load_vlm(args: ModelArguments) -> tuple[nn.Module, Any, str]:
    """(model, processor, collator family) of a chat VLM: a tiny one built from a config, or a checkpoint."""
    if args.model_name_or_path.startswith(TINY_PREFIX):
        from .models import build_tiny, build_tiny_processor

        name = args.model_name_or_path[len(TINY_PREFIX) :]
        if name == "clip":
            raise ValueError("tiny:clip is a CLIP model: use the clip_mtil recipe")
        family = args.model_family or name
        model = build_tiny(name).model.to(_dtype(args.torch_dtype) if args.torch_dtype != "auto" else torch.float32)
        return model, build_tiny_processor(name), family
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    family = args.model_family or FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family is None or family == "clip":
        raise ValueError(
            f"{args.model_name_or_path}: model_type {config.model_type!r} has no chat collator family; set "
            f"model_family to one of llava, llava_next_video, video_llava, qwen2_vl"
        )
    kwargs: dict[str, Any] = {"dtype": _dtype(args.torch_dtype), "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    quantization = _quantization_config(args, family)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = _pretrained_class(config.model_type).from_pretrained(args.model_name_or_path, **kwargs)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    processor = AutoProcessor.from_pretrained(
        args.processor_name_or_path or args.model_name_or_path, trust_remote_code=args.trust_remote_code, **pixels
    )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:  # LLaVA-1.5's Llama tokenizer has none; pad with unk like the reference
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, processor, family


def load_clip(args: ModelArguments) -> tuple[nn.Module, Any]:
    """(CLIPModel, CLIPProcessor): the tiny one or a checkpoint."""
    if args.model_name_or_path.startswith(TINY_PREFIX):
        from .models import build_tiny, build_tiny_processor

        name = args.model_name_or_path[len(TINY_PREFIX) :]
        if name != "clip":
            raise ValueError(f"the clip_mtil recipe needs tiny:clip, got {args.model_name_or_path}")
        return build_tiny("clip").model, build_tiny_processor("clip")
    from transformers import CLIPModel, CLIPProcessor

    kwargs: dict[str, Any] = {"dtype": _dtype(args.torch_dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = CLIPModel.from_pretrained(args.model_name_or_path, **kwargs)
    processor = CLIPProcessor.from_pretrained(args.processor_name_or_path or args.model_name_or_path)
    return model, processor


def keeplora_config(
    section: dict[str, Any], extra_modules_to_save: Sequence[str] = ()
) -> tuple[KeepLoRAConfig, dict[str, float]]:
    """The `keeplora:` section as a `KeepLoRAConfig`, plus its `principal_energy_pattern` (regex -> epsilon_w).

    `principal_energy_pattern` gives some targets another epsilon_w than `principal_energy` (CLIP's reference:
    0.85 for the vision tower, 0.2 for the text tower); `seed_principal_energy` applies it.
    """
    section = dict(section)
    pattern = section.pop("principal_energy_pattern", None) or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in pattern.values()):
        raise ValueError(f"keeplora.principal_energy_pattern must map regexes to energies in [0, 1], got {pattern!r}")
    fields = {f.name for f in dataclasses.fields(KeepLoRAConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"keeplora: unknown KeepLoRAConfig fields {unknown}")
    if "target_modules" not in section:
        raise ValueError("keeplora: target_modules is required (a regex matched against full module names)")
    modules = list(section.pop("modules_to_save", None) or [])
    modules += [m for m in extra_modules_to_save if m not in modules]
    config = KeepLoRAConfig(**section, modules_to_save=modules or None)
    return config, {str(k): float(v) for k, v in pattern.items()}


def seed_principal_energy(model: PeftModel, pattern: dict[str, float]) -> list[str]:
    """Compute the principal basis of targets matching a `pattern` regex with that epsilon_w instead of the default.

    `begin_task` computes a basis only where none exists, so seeding before the first task is all it takes; the
    bases are saved with the adapter like any other. Returns the seeded layer names.
    """
    if not pattern:
        return []
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    config = tuner.peft_config[adapter]
    # as begin_task does it: the configured state dtype (float32 by default) and SVD solver, when the config has them
    dtype = getattr(torch, getattr(config, "state_dtype", "float32"))
    solver = {"solver": config.principal_solver} if getattr(config, "principal_solver", None) else {}
    seeded = []
    for name, module in keeplora_layers(model, adapter).items():
        energy = next((e for regex, e in pattern.items() if re.search(regex, name)), None)
        state = layer_state(module, adapter)
        if energy is None or state.initialised:  # (never `state.principal`: a complement-only state recomputes it)
            continue
        weight = base_weight(module)
        principal, energies = principal_basis(weight, energy, return_energies=True, **solver)
        state.fingerprint = weight_fingerprint(weight)
        state.principal = principal.to(dtype)
        state.memory = principal.new_zeros(principal.shape[0], 0).to(dtype)
        state.principal_energies = energies  # what the state keeps of the basis once it stores only the complement
        seeded.append(name)
    if not seeded and tuner.progress(adapter).task_index == 0:
        raise ValueError(f"keeplora.principal_energy_pattern {pattern} matches no KeepLoRA target")
    return seeded


class _SeparateLearningRate:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=...)`: the projector gets its own learning rate.

    The Trainer calls `factory()(model, **kwargs)`; the optimizer is the one `TrainingArguments.optim` names, with
    four groups (adapter / projector x decay / no decay), so the scheduler scales both learning rates alike.
    """

    def __init__(self, training: TrainingArguments, projector_lr: float) -> None:
        self.training = training
        self.projector_lr = projector_lr

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return self.build

    def build(self, model: nn.Module, **_: Any) -> torch.optim.Optimizer:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.training, model)
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            projector = "modules_to_save" in name
            decay = parameter.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((projector, decay), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.training.weight_decay if decay else 0.0,
                "lr": self.projector_lr if projector else self.training.learning_rate,
            }
            for (projector, decay), params in sorted(groups.items())
        ]
        return optimizer_cls(param_groups, **kwargs)


def projector_optimizer(training: TrainingArguments, projector_lr: float | None) -> dict[str, Any]:
    """Trainer keyword arguments that give the projector (modules_to_save) its own learning rate, or nothing."""
    if projector_lr is None or projector_lr == training.learning_rate:
        return {}
    return {"optimizer_cls_and_kwargs": (_SeparateLearningRate(training, projector_lr), {})}


# -- tasks ---------------------------------------------------------------------------------------------------------


def _path(root: str, value: str | None, what: str, task: str) -> Path:
    if not value:
        raise ValueError(f"task {task!r}: `{what}` is required")
    path = Path(value)
    # absolute: load_classification joins a class-folder tree's relative image paths onto the tree once more
    return (path if path.is_absolute() else Path(root) / path).resolve()


def _with_extra_columns(
    dataset: datasets.Dataset, path: Path, columns: Sequence[str] = ("answers",)
) -> datasets.Dataset:
    """Carry columns the loaders drop (the `answers` list of VQA-style rows) from the file into the dataset.

    The loaders keep every row of a valid file in order, so row `i` of the dataset is row `i` of the file.
    """
    raw = read_rows(path)
    for column in columns:
        if not any(isinstance(r, dict) and column in r for r in raw):
            continue
        values, errors = [], []
        for index, row in enumerate(raw):
            value = row.get(column)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
                errors.append(f"{row_name(str(path), index, row)}: {column!r} must be a non-empty list of answers "
                              f"when other rows have one, got {value!r}")
                continue
            values.append([str(v) for v in value])
        if errors:
            raise DataFormatError(errors)
        dataset = dataset.add_column(column, values)
    return dataset


def _limit(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


def _check_lengths(dataset: datasets.Dataset, collator: VLMChatCollator) -> list[str]:
    """`validate_lengths`, spread over the ranks, with the file's own row numbers in every message."""
    rank, world = _world()
    source = source_of(dataset)
    errors = []
    for index in range(rank, len(dataset), world):
        row = dataset[index]
        try:
            validate_lengths([row], collator)
        except DataFormatError as error:
            local = row_name("<dataset>", 0, row)
            errors += [row_name(source, index, row) + e[len(local) :] for e in error.errors]
    return errors


def _sort_errors(errors: list[str]) -> list[str]:
    def key(message: str) -> tuple[str, int]:
        found = re.search(r"^(.*?): row (\d+)", message)
        return (found.group(1), int(found.group(2))) if found else (message, 0)

    return sorted(errors, key=key)


def chat_collator(config: RecipeConfig, processor: Any, family: str) -> VLMChatCollator:
    """The recipe's training collator; generation-based evaluation renders the same rows through its twin."""
    return VLMChatCollator(processor, max_length=config.data.max_length, model_family=family,
                           num_frames=config.data.num_frames)


def chat_media(config: RecipeConfig, family: str) -> str:
    """"image" or "video": what a chat recipe's tasks hold, for callers that have only its config (the scripts know).

    A task's `video_folder` / `image_folder` says it; without either, the model's family does (Video-LLaVA and
    LLaVA-NeXT-Video read clips, the others images).
    """
    for media in ("video", "image"):
        if any(f"{media}_folder" in entry for entry in [*config.tasks, *config.general_sets]):
            return media
    return "video" if family in VIDEO_FAMILIES else "image"


def build_chat_tasks(
    config: RecipeConfig, collator: VLMChatCollator, media: str
) -> tuple[list[ContinualTask], list[GeneralSet]]:
    """Load, check and wrap every task of the config, before any training: one error lists every bad row.

    Each task entry: `name`, `train_file`, `eval_file`, `image_folder` (or `video_folder`; default: data_root),
    `metric` (a normaliser of `generation_metric`: exact_match, vqa, multiple_choice, token_f1), optional
    `max_new_tokens`, `eval_max_samples`. General sets: `name`, `eval_file`, folder, `metric`.
    """
    if media not in ("image", "video"):
        raise ValueError(f"media must be image or video, got {media!r}")
    data = config.data
    loader = load_llava_json if media == "image" else load_video_qa_json
    folder_key = f"{media}_folder"
    errors: list[str] = []
    loaded: dict[tuple[str, str], datasets.Dataset] = {}

    def load(entry: dict[str, Any], split: str) -> None:
        file = _path(data.data_root, entry.get(f"{split}_file"), f"{split}_file", entry["name"])
        folder = _path(data.data_root, entry.get(folder_key) or ".", folder_key, entry["name"])
        try:
            dataset = _with_extra_columns(loader(file, folder), file)
        except DataFormatError as error:
            errors.extend(error.errors)
            return
        limit = data.train_max_samples if split == "train" else entry.get("eval_max_samples", data.eval_max_samples)
        loaded[(entry["name"], split)] = _limit(dataset, limit)

    known = {"name", "train_file", "eval_file", folder_key, "metric", "max_new_tokens", "eval_max_samples"}
    for entry, splits in [(t, ("train", "eval")) for t in config.tasks] + [(g, ("eval",)) for g in config.general_sets]:
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(
                f"{config.source}: task {entry['name']!r} has unknown keys {unknown}; known: {sorted(known)}"
            )
        if entry.get("metric", "exact_match") not in NORMALIZERS:
            raise ValueError(
                f"task {entry['name']!r}: metric must be one of {sorted(NORMALIZERS)}, got {entry['metric']!r}"
            )
        for split in splits:
            load(entry, split)
    if data.check_lengths:  # the files that loaded are measured too, so one error lists every problem
        lengths: list[str] = []
        for dataset in loaded.values():
            lengths += _check_lengths(dataset, collator)
        errors += _sort_errors(_gather_lists(lengths))
    if errors:
        raise DataFormatError(errors)

    def metric(entry: dict[str, Any]):
        return generation_metric(
            collator,
            entry.get("metric", "exact_match"),
            batch_size=data.eval_batch_size,
            max_new_tokens=int(entry.get("max_new_tokens", data.max_new_tokens)),
        )

    tasks = [
        ContinualTask(t["name"], loaded[(t["name"], "train")], loaded[(t["name"], "eval")], metric(t))
        for t in config.tasks
    ]
    general = [GeneralSet(g["name"], loaded[(g["name"], "eval")], metric(g)) for g in config.general_sets]
    return tasks, general


# -- CLIP ----------------------------------------------------------------------------------------------------------


class TaskClipCollator:
    """One `ClipCollator` per task (its own class prompts), chosen by the rows' `task` column.

    The runner passes one collator to every task's Trainer; each batch comes from one task's dataset.
    """

    def __init__(self, collators: dict[str, ClipCollator]) -> None:
        self.collators = collators

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        names = {r["task"] for r in rows}
        if len(names) != 1:
            raise ValueError(f"a CLIP batch must come from one task, got rows of {sorted(names)}")
        return self.collators[names.pop()](rows)


def clip_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """`compute_loss_func` for the Trainer: cross-entropy of image-to-class-prompt logits.

    Summed and divided by the items of the whole accumulated batch when the Trainer counts them (it then skips its
    own division by the accumulation steps), else the batch mean.
    """
    logits = outputs.logits_per_image
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def clip_zero_shot_metric(collator: ClipCollator, batch_size: int = 64) -> Callable[[nn.Module, Any], float]:
    """Zero-shot classification accuracy: each image against every class prompt of its task, argmax wins."""

    def metric(model: nn.Module, dataset: Any) -> float:
        rank, world = _world()
        indices = list(range(rank, len(dataset), world))
        parameter = next(model.parameters())
        counts = torch.zeros(2, dtype=torch.float64, device=parameter.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(indices), batch_size):
                    rows = [dataset[i] for i in indices[start : start + batch_size]]
                    batch = move_to(collator(rows), parameter.device)
                    labels = batch.pop("labels")
                    batch["pixel_values"] = batch["pixel_values"].to(parameter.dtype)
                    predicted = model(**batch).logits_per_image.argmax(dim=-1)
                    counts[0] += (predicted == labels).sum()
                    counts[1] += len(labels)
        finally:
            model.train(was_training)
        if world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return float(counts[0] / counts[1])

    return metric


def _class_names(entry: dict[str, Any], root: str) -> list[str] | None:
    names = entry.get("class_names")
    if isinstance(names, str):  # a file: one name per line, or a JSON list
        path = _path(root, names, "class_names", entry["name"])
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            names = json.loads(text)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    return names


def build_classification_tasks(
    config: RecipeConfig, processor: Any
) -> tuple[list[ContinualTask], list[GeneralSet], TaskClipCollator]:
    """CLIP tasks: `name`, `train` / `eval` (a class-folder tree, or a CSV/JSON table with `image_folder`),
    optional `class_names` (a list, or a file of one name per line / a JSON list) and `prompt` ("a photo of a {}.")."""
    data = config.data
    errors: list[str] = []
    known = {"name", "train", "eval", "image_folder", "class_names", "prompt"}
    collators, loaded = {}, {}
    entries = [(t, ("train", "eval")) for t in config.tasks] + [(g, ("eval",)) for g in config.general_sets]
    for entry, splits in entries:
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(
                f"{config.source}: task {entry['name']!r} has unknown keys {unknown}; known: {sorted(known)}"
            )
        names = _class_names(entry, data.data_root)
        folder = entry.get("image_folder")
        for split in splits:
            source = _path(data.data_root, entry.get(split), split, entry["name"])
            try:
                images = _path(data.data_root, folder, "image_folder", entry["name"]) if folder else None
                dataset = load_classification(source, images, names)
            except DataFormatError as error:
                errors.extend(error.errors)
                continue
            names = names or dataset.features["label"].names
            if split == "train":
                dataset = _limit(dataset, data.train_max_samples)
            else:
                dataset = _limit(dataset, data.eval_max_samples)
            loaded[(entry["name"], split)] = dataset.add_column("task", [entry["name"]] * len(dataset))
        if names is not None:
            collators[entry["name"]] = ClipCollator(processor, names, entry.get("prompt", data.clip_prompt))
    if errors:
        raise DataFormatError(errors)
    tasks = [
        ContinualTask(t["name"], loaded[(t["name"], "train")], loaded[(t["name"], "eval")],
                      clip_zero_shot_metric(collators[t["name"]], data.eval_batch_size))
        for t in config.tasks
    ]
    general = [
        GeneralSet(g["name"], loaded[(g["name"], "eval")],
                   clip_zero_shot_metric(collators[g["name"]], data.eval_batch_size))
        for g in config.general_sets
    ]
    return tasks, general, TaskClipCollator(collators)


# -- the run -------------------------------------------------------------------------------------------------------


def prepare(config: RecipeConfig, writer: Callable[[Path], None] | None = None) -> PartialState:
    """Logging, the distributed state, refusal of sharded parameters, and the tiny data set when asked for."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_sharded_parameters(config.training)  # first: setting up a DeepSpeed state would already need deepspeed
    _ = config.training.device  # sets up the distributed state the way the Trainer will
    state = PartialState()
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # the collators read the rows' own columns (messages, images, videos, task), which the model's forward lacks
    config.training.remove_unused_columns = False
    if config.data.tiny_data and writer is not None:
        with state.main_process_first():
            if state.is_main_process:
                writer(Path(config.data.data_root))
    return state


def run_recipe(
    config: RecipeConfig,
    model: nn.Module,
    tasks: list[ContinualTask],
    general: list[GeneralSet],
    collator: Callable,
    *,
    trainer_kwargs: dict[str, Any] | None = None,
    principal_energy_pattern: dict[str, float] | None = None,
    peft_config: KeepLoRAConfig,
) -> dict[str, Any]:
    """Wrap `model` with KeepLoRA, run the sequence with `ContinualRunner`, return (and write) the results."""
    training = config.training
    if getattr(training, "activation_checkpointing", training.gradient_checkpointing) and hasattr(
        model, "enable_input_require_grads"
    ):
        model.enable_input_require_grads()  # the frozen embeddings must still pass gradients to checkpointed blocks
    peft_model = get_peft_model(model, peft_config)
    seeded = seed_principal_energy(peft_model, principal_energy_pattern or {})
    if seeded:
        logger.info("principal_energy_pattern: %d targets use their own epsilon_w", len(seeded))
    if PartialState().is_main_process:
        peft_model.print_trainable_parameters()
    runner = ContinualRunner(
        peft_model,
        tasks,
        training,
        training.output_dir,
        general_sets=general,
        data_collator=collator,
        method=config.recipe.method_name,
        run_config={"recipe": config.describe()},
        overwrite=config.recipe.overwrite_run,
        trainer_kwargs=trainer_kwargs,
    )
    return runner.run()


def run_chat_recipe(argv: Sequence[str] | None, media: str) -> dict[str, Any]:
    """A chat recipe's whole run on `media` ("image": recipes/llava_vqa, "video": recipes/video_llm).

    Arguments, the tiny data when asked for, the model, every task loaded and checked before training (files,
    `<image>` / `<video>` markers and media, conversations, lengths), then KeepLoRA++ over the sequence.
    """
    config = parse_recipe_args(argv)
    prepare(config, writer=TINY_DATA_WRITERS[media])
    model, processor, family = load_vlm(config.model)
    collator = chat_collator(config, processor, family)
    tasks, general = build_chat_tasks(config, collator, media=media)

    projector = config.model.projector_modules or PROJECTOR_MODULES[family]
    peft_config, energy_pattern = keeplora_config(config.keeplora, projector if config.model.train_projector else ())
    trainer_kwargs = {}
    if config.model.train_projector:
        trainer_kwargs.update(projector_optimizer(config.training, config.model.projector_learning_rate))
    return run_recipe(config, model, tasks, general, collator, trainer_kwargs=trainer_kwargs,
                      principal_energy_pattern=energy_pattern, peft_config=peft_config)


# -- tiny data in the real formats, for the tiny configs ----------------------------------------------------------

_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30),
            "purple": (140, 40, 180), "cyan": (30, 210, 210)}  # fmt: skip


def _image(path: Path, colour: str, rng: np.random.Generator, size: int = 16) -> None:
    pixels = np.clip(np.array(_COLOURS[colour]) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def write_tiny_vqa_data(root: str | os.PathLike, train: int = 8, eval_: int = 4) -> Path:
    """Three tiny LLaVA-format tasks (single image, multi-turn, two images with VQA answer lists, lettered choices)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    for split, count in (("train", train), ("eval", eval_)):
        rows: dict[str, list[dict]] = {"colour": [], "pair": [], "choice": []}
        for i in range(count):
            a, b = rng.choice(colours, 2)
            _image(root / "images" / f"{split}_{i}_a.png", str(a), rng)
            _image(root / "images" / f"{split}_{i}_b.png", str(b), rng)
            first = f"images/{split}_{i}_a.png"
            turns = [{"from": "human", "value": "<image>\nwhat colour is the image?"}, {"from": "gpt", "value": str(a)}]
            if i % 2:  # multi-turn
                answer = "yes" if a == b else "no"
                turns += [{"from": "human", "value": f"is it {b}?"}, {"from": "gpt", "value": answer}]
            rows["colour"].append({"id": f"colour-{split}-{i}", "image": first, "conversations": turns})
            same = "yes" if a == b else "no"
            rows["pair"].append({
                "id": f"pair-{split}-{i}", "image": [first, f"images/{split}_{i}_b.png"],
                "conversations": [{"from": "human", "value": "<image>\n<image>\nare the two images the same colour?"},
                                  {"from": "gpt", "value": same}],
                "answers": [same, same, "no" if same == "yes" else "yes"],
            })
            options = [str(a), str(b)] if i % 2 else [str(b), str(a)]
            rows["choice"].append({
                "id": f"choice-{split}-{i}", "image": first,
                "conversations": [{"from": "human",
                                   "value": f"<image>\nwhat colour is the image? a. {options[0]}, b. {options[1]}"},
                                  {"from": "gpt", "value": "a" if options[0] == a else "b"}],
            })
        for name, task_rows in rows.items():
            _write_json(root / name / f"{split}.json", task_rows)
    return root


def write_tiny_video_data(root: str | os.PathLike, train: int = 8, eval_: int = 4) -> Path:
    """Two tiny video-QA tasks: clips of 2 to 5 frames, question/answer rows (with options) and conversation rows."""
    root = Path(root)
    rng = np.random.default_rng(1)
    colours = ["red", "green", "blue", "yellow"]
    for split, count in (("train", train), ("eval", eval_)):
        first_rows, count_rows = [], []
        for i in range(count):
            length = 2 + i % 4
            sequence = [str(c) for c in rng.choice(colours, length)]
            frames = np.stack([
                np.clip(np.array(_COLOURS[c]) + rng.integers(-10, 11, (16, 16, 3)), 0, 255).astype(np.uint8)
                for c in sequence
            ])
            clip = root / "videos" / f"{split}_{i}.mp4"
            clip.parent.mkdir(parents=True, exist_ok=True)
            write_video(clip, frames)
            if i % 2:
                first_rows.append({"id": f"first-{split}-{i}", "video": clip.name,
                                   "question": "what colour is the first frame?", "answer": sequence[0]})
            else:
                first_rows.append({"id": f"first-{split}-{i}", "video": clip.name, "conversations": [
                    {"from": "human", "value": "<video>\nwhat colour is the first frame?"},
                    {"from": "gpt", "value": sequence[0]}]})
            count_rows.append({"id": f"last-{split}-{i}", "video": clip.name,
                               "question": "what colour is the last frame?", "options": sorted(colours),
                               "answer": sequence[-1]})
        _write_json(root / "first" / f"{split}.json", first_rows)
        _write_json(root / "last" / f"{split}.json", count_rows)
    return root


def write_tiny_classification_data(root: str | os.PathLike, train: int = 4, eval_: int = 2) -> Path:
    """Two tiny classification tasks: class folders (red/green/blue), and a CSV table (yellow/purple/cyan)."""
    root = Path(root)
    rng = np.random.default_rng(2)
    for split, count in (("train", train), ("eval", eval_)):
        for colour in ("red", "green", "blue"):
            for i in range(count):
                _image(root / "primary" / split / colour / f"{i}.png", colour, rng)
        lines = ["image,label"]
        for colour in ("yellow", "purple", "cyan"):
            for i in range(count):
                _image(root / "secondary" / "images" / f"{split}_{colour}_{i}.png", colour, rng)
                lines.append(f"images/{split}_{colour}_{i}.png,{colour}")
        (root / "secondary" / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# The tiny data set each kind of recipe writes into data_root with `tiny_data: true`.
TINY_DATA_WRITERS: dict[str, Callable[[Path], Path]] = {
    "image": write_tiny_vqa_data,
    "video": write_tiny_video_data,
    "classification": write_tiny_classification_data,
}
