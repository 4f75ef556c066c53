"""Export a KeepLoRA++ model as one plain PEFT LoRA adapter that any LoRA consumer loads without keeplora_hf."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from .continual.checkpoint import atomic_directory, with_default_mode
from .continual.run_dir import ADAPTER_FILES, RUN_FILE
from .sharding import is_sharded
from .tuner.layer import layer_state
from .tuner.model import keeplora_layers, tuner_of
from .tuner.finished import FinishedTask


def export_lora(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's whole change to its pre-trained weights as a plain LoRA adapter in `path`.

    A `path` that exists and is not empty is refused unless `overwrite`, and a directory holding a continual run
    (`run.json`) is never replaced. The adapter is written beside it and moved into place in one step.

    Each finished task is a rank-r update `s_l * B_t @ A_t`; stacking them gives one LoRA of rank `k * r` per layer
    (plus the task under way, if any). Its plain-LoRA scaling `alpha_l / (k r)` equals `s_l` through a per-layer
    `alpha_pattern`, so the adapter applied to the *original* base model reproduces this model's outputs.
    """
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    config = tuner.peft_config[adapter]
    layers = keeplora_layers(tuner.model, adapter)
    if config.modules_to_save:
        raise ValueError(
            "export_lora: modules_to_save are not part of a plain LoRA export yet; save the KEEPLORA adapter instead"
        )

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    ranks = set()
    for name, module in layers.items():
        updates = _updates(module, adapter)
        reference = next((u.scaling for u in updates if u.scaling != 0), 1.0)
        lora_a = torch.cat([u.lora_A for u in updates])
        lora_b = torch.cat([u.lora_B * (u.scaling / reference) for u in updates], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
        pattern = re.escape(name)
        rank_pattern[pattern] = lora_a.shape[0]
        alpha_pattern[pattern] = reference * lora_a.shape[0]
        ranks.add(lora_a.shape[0])

    plain = LoraConfig(
        r=max(ranks),
        lora_alpha=config.lora_alpha,
        target_modules=sorted(layers),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=config.lora_dropout,
        bias="none",
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )
    return _write_atomically(Path(path), plain, tensors, overwrite)


def _updates(module: nn.Module, adapter: str) -> list[FinishedTask]:
    """The layer's finished tasks, then the task under way when it has moved away from zero."""
    updates = list(layer_state(module, adapter).tasks)
    lora_b = module.lora_B[adapter].weight
    if is_sharded(lora_b):  # reading it would be a collective, and export runs on the main process only
        raise ValueError(
            "export_lora reads the live adapter, which FSDP2 or ZeRO-3 shards across ranks; export from the saved adapter "
            "instead (keeplora_hf.hub.export_run on the run directory, or load it into an unsharded model)"
        )
    if bool(lora_b.detach().abs().sum() > 0):
        current = FinishedTask(module.lora_A[adapter].weight.detach().float(), lora_b.detach().float(), float(module.scaling[adapter]))
        updates.append(current)
    if not updates:  # nothing learned yet: an all-zero adapter of the configured rank
        updates.append(FinishedTask(torch.zeros_like(module.lora_A[adapter].weight).float(), lora_b.detach().float() * 0, 1.0))
    return [FinishedTask(u.lora_A.cpu(), u.lora_B.cpu(), u.scaling) for u in updates]


#: what an export writes: the only entries `overwrite` may replace
EXPORT_FILES = ADAPTER_FILES


def check_export_target(path: Path, overwrite: bool) -> None:
    """Refuse to export over anything but an absent or empty directory, or, with `overwrite`, a previous export
    (nothing but the files an export writes): never over a run, data or anything else, which would be deleted."""
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
    foreign = [e.name for e in entries if e.name not in EXPORT_FILES or not e.is_file() or e.is_symlink()]
    if foreign or not (path / ADAPTER_FILES[0]).is_file():
        shown = ", ".join(foreign[:5]) or f"no {ADAPTER_FILES[0]}"
        raise FileExistsError(
            f"export target {path} is not a previous export (in the way: {shown}); overwrite only replaces a directory "
            f"holding nothing but {', '.join(EXPORT_FILES)}. Choose another directory."
        )


def _write_atomically(path: Path, config: LoraConfig, tensors: dict[str, torch.Tensor], overwrite: bool) -> Path:
    check_export_target(path, overwrite)
    with atomic_directory(path) as staging:  # an old export is moved aside, not deleted, until the new one is in place
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / ADAPTER_FILES[1]), metadata={"format": "pt"})
        with_default_mode(staging / ADAPTER_FILES[1])  # safetensors writes it 0600
        with open(staging / ADAPTER_FILES[0]) as f:
            json.load(f)  # fail here, not in the consumer, if the config did not serialise
    return path
