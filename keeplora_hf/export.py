"""Export a KeepLoRA++ model for serving, so that vLLM, SGLang and plain PEFT compute exactly what it computes.

- `export_lora`: one plain LoRA adapter that needs nothing but `r`, `lora_alpha` and `target_modules`. Each layer's
  finished tasks (and the task under way) are stacked into one `A` and one `B`, each task's layer scale `s_l` folded
  into its columns of `B` in float32, and every layer padded with zero rows to one rank `R`; `lora_alpha = R`, so
  the `lora_alpha / r` every loader applies is 1. No `rank_pattern` / `alpha_pattern` (which vLLM and SGLang drop
  without a word), no rsLoRA, no `modules_to_save`, no bias.
- `export_lora(..., language_model_only=True)`: servers apply LoRA to the language model only. The LoRA then holds the
  language model's targets, and `base_model/` beside it is a merged checkpoint of everything else the sequence
  changed (vision-tower targets, a fully trained projector), so the pair reproduces the model.
- `export_merged`: one `save_pretrained` checkpoint with everything folded in, for any server.
- KeepLoRA++cls's classifier heads, which neither a LoRA adapter nor a transformers checkpoint can carry, are written
  beside either as `keeplora_heads.safetensors`; `keeplora_hf.tuner.heads.load_task_heads` attaches them to the
  loaded model.

An export never replaces anything it did not write (`keeplora_export.json` lists what it wrote).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from .continual.checkpoint import atomic_directory, with_default_mode
from .continual.run_dir import ADAPTER_FILES, RUN_FILE
from .merged_checkpoint import layer_updates, write_merged_checkpoint
from .tuner.autocast import full_precision
from .tuner.heads import save_task_heads
from .tuner.model import KeepLoRAModel, keeplora_layers, tuner_of

#: the file every export writes, listing the entries it wrote: what `overwrite` may replace
MANIFEST = "keeplora_export.json"
SERVING_README = "README.md"
MERGED_BASE_DIR = "base_model"


@full_precision
def export_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    language_model_only: bool = False,
    processor_from: str | os.PathLike | None = None,
) -> Path:
    """Write the model's whole change to its pre-trained weights as one plain LoRA adapter in `path` (see the module
    docstring); with `language_model_only`, the language model's LoRA and a merged base checkpoint for the rest
    (with the tokenizer / processor files of the folder `processor_from`, when given).

    A `path` that exists and is not empty is refused, unless `overwrite` and it is a previous export. The export is
    written beside it and moved into place in one step.
    """
    tuner, adapter = _tuner_and_adapter(model)
    config = tuner.peft_config[adapter]
    layers = keeplora_layers(tuner.model, adapter)
    if config.modules_to_save and not language_model_only:
        raise ValueError(
            f"export_lora: modules_to_save {sorted(config.modules_to_save)} were trained fully, which a LoRA adapter "
            "cannot carry. Export with language_model_only=True (--language-model-only: they go into the merged base "
            "beside the LoRA), or export_merged (--merged)"
        )
    served = layers
    if language_model_only:
        prefix = language_model_prefix(tuner.model)
        served = {name: m for name, m in layers.items() if name.startswith(prefix)}
        if not served:
            raise ValueError(f"export_lora: no KeepLoRA target lies in the language model ({prefix}); export_merged instead")
    tensors, rank = serving_tensors(served, adapter)
    plain = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(served),
        bias="none",
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )

    def write(staging: Path) -> None:
        plain.save_pretrained(str(staging))
        save_file(tensors, str(staging / ADAPTER_FILES[1]), metadata={"format": "pt"})
        with_default_mode(staging / ADAPTER_FILES[1])  # safetensors writes it 0600
        if language_model_only:
            write_merged_checkpoint(tuner, adapter, staging / MERGED_BASE_DIR, folded=set(layers) - set(served))
            copy_processor_files(processor_from, staging / MERGED_BASE_DIR)
        (staging / SERVING_README).write_text(serving_readme(rank, sorted(served), language_model_only))
        _write_heads(tuner, staging)

    return _write_atomically(Path(path), write, overwrite)


def export_merged(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    processor_from: str | os.PathLike | None = None,
) -> Path:
    """Write one `save_pretrained` checkpoint of the model with every learned update folded into its weights (summed
    in float32, rounded once to the base dtype, as `merge_and_unload` does), loadable by `AutoModel*.from_pretrained`
    and any server, with the tokenizer / processor files of the folder `processor_from` when given. The model itself
    is not changed."""
    tuner, adapter = _tuner_and_adapter(model)
    layers = keeplora_layers(tuner.model, adapter)

    def write(staging: Path) -> None:
        write_merged_checkpoint(tuner, adapter, staging, folded=set(layers))
        copy_processor_files(processor_from, staging)
        _write_heads(tuner, staging)

    return _write_atomically(Path(path), write, overwrite)


def _write_heads(tuner: KeepLoRAModel, staging: Path) -> None:
    """The classifier heads (KeepLoRA++cls), if the model has them, beside the export."""
    path = save_task_heads(tuner.model, staging)
    if path is not None:
        with_default_mode(path)  # safetensors writes it 0600


#: the tokenizer and processor files of a checkpoint folder, copied beside a merged export
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
)


def copy_processor_files(source: str | os.PathLike | None, target: Path) -> None:
    """Copy the tokenizer / processor files a local checkpoint folder `source` has (none: nothing to copy)."""
    if source is None or not Path(source).is_dir():
        return
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, target / name)


def serving_tensors(layers: dict[str, LoraLayer], adapter: str) -> tuple[dict[str, torch.Tensor], int]:
    """Each layer's `lora_A` / `lora_B` (scales folded into `B`, float32, padded to one rank), keyed as PEFT saves
    them, and that rank."""
    factors = {}
    for name, module in layers.items():
        updates = layer_updates(module, adapter)
        if updates:
            lora_A = torch.cat([u.lora_A.cpu() for u in updates])
            lora_B = torch.cat([u.lora_B.cpu() * u.scaling for u in updates], dim=1)
        else:  # nothing learned yet: one zero row
            base = module.get_base_layer()
            lora_A, lora_B = torch.zeros(1, base.in_features), torch.zeros(base.out_features, 1)
        factors[name] = (lora_A, lora_B)
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for name, (lora_A, lora_B) in factors.items():
        missing = rank - lora_A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([lora_A, lora_A.new_zeros(missing, lora_A.shape[1])])
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], missing)], 1)
    return {k: v.contiguous() for k, v in tensors.items()}, rank


def language_model_prefix(model: nn.Module) -> str:
    """The module path of the model's language model (`get_decoder()`), as the targets are named (`model.language_model`
    for LLaVA-style models in transformers 5), plus the separator."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    name = next((n for n, m in model.named_modules() if m is decoder and n), None)
    if name is None:
        raise ValueError(
            f"language_model_only: {type(model).__name__} has no language model that get_decoder() names; export the "
            "whole LoRA, or export_merged"
        )
    return f"{name}."


def serving_readme(rank: int, targets: list[str], language_model_only: bool) -> str:
    """What a server needs to know to load the export (its rank, its targets, where the base is)."""
    base = (
        f"Serve it on the merged base in `{MERGED_BASE_DIR}/`, which holds everything else the sequence changed."
        if language_model_only
        else "Serve it on the original pre-trained base model."
    )
    return (
        "# KeepLoRA++ export: a plain LoRA adapter\n\n"
        f"- rank `r` = {rank} on every layer (`lora_alpha` = {rank}: the scale `lora_alpha / r` is 1; each layer's "
        "KeepLoRA++ scale is folded into its `lora_B`). Servers need `--max-lora-rank` >= "
        f"{rank} (vLLM and SGLang).\n"
        f"- {len(targets)} target modules, from `{targets[0]}` to `{targets[-1]}`.\n"
        f"- {base}\n\n"
        "```bash\n"
        f"vllm serve BASE --enable-lora --lora-modules keeplora=THIS_FOLDER --max-lora-rank {rank}\n"
        f"python -m sglang.launch_server --model-path BASE --lora-paths keeplora=THIS_FOLDER --max-lora-rank {rank}\n"
        "```\n"
    )


def _tuner_and_adapter(model: nn.Module) -> tuple[KeepLoRAModel, str]:
    tuner = tuner_of(model)
    return tuner, tuner.keeplora_adapter()


def check_export_target(path: Path, overwrite: bool) -> None:
    """Refuse to export over anything but an absent or empty directory, or, with `overwrite`, a previous export
    (nothing but what its manifest lists, or the two adapter files of an older export): never over a run, data or
    anything else, which would be deleted."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"export target {path} exists and is not a directory")
    if (path / RUN_FILE).exists():
        raise FileExistsError(f"export target {path} holds a continual run ({RUN_FILE}); choose another directory")
    entries = sorted(path.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"export target {path} is not empty; pass overwrite=True (--overwrite) to replace it")
    written = _previous_export(path)
    foreign = [e.name for e in entries if e.name not in written or e.is_symlink()]
    if foreign or not written:
        shown = ", ".join(foreign[:5]) or f"no {MANIFEST}"
        raise FileExistsError(
            f"export target {path} is not a previous export (in the way: {shown}); overwrite only replaces what an "
            "export wrote (the entries its keeplora_export.json lists). Choose another directory."
        )


def _previous_export(path: Path) -> set[str]:
    """The entries a previous export wrote in `path` (empty if it is not one)."""
    try:
        return {*json.loads((path / MANIFEST).read_text())["entries"], MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        legacy = set(ADAPTER_FILES)  # exports written before the manifest: the two adapter files only
        return legacy if {e.name for e in path.iterdir()} <= legacy and (path / ADAPTER_FILES[0]).is_file() else set()


def _write_atomically(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    check_export_target(path, overwrite)
    with atomic_directory(path) as staging:  # an old export is moved aside, not deleted, until the new one is in place
        write(staging)
        entries = sorted(e.name for e in staging.iterdir())
        (staging / MANIFEST).write_text(json.dumps({"entries": entries}, indent=1) + "\n")
        with_default_mode(staging / MANIFEST)
    return path
