"""A saved adapter folder checked before PEFT loads it, so a damaged weights file or a hand-edited rank is reported
with the file, the layer and what to do, rather than as a raw `SafetensorError` or a size-mismatch dump."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

#: the saved key of a layer's LoRA weight -> the dimension of its shape that is the rank
_RANK_DIMENSION = {".lora_A.weight": 0, ".lora_B.weight": 1}
#: what PEFT puts in front of a base model's module names in the saved keys
_SAVED_PREFIX = "base_model.model."


def check_adapter_files(directory: str | os.PathLike, config: Any) -> None:
    """Refuse a local adapter folder whose weights file is missing or unreadable, or whose LoRA ranks are not the
    ones `config` (its `adapter_config.json`) gives.

    A Hub repo id (no such local folder) is left to PEFT; so is a folder saved with `safe_serialization=False`.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        if (folder / WEIGHTS_NAME).is_file():
            return
        raise FileNotFoundError(
            f"{weights} not found: the adapter folder has {CONFIG_NAME} but no weights. Copy {SAFETENSORS_WEIGHTS_NAME} "
            "back into it, or save the adapter again with model.save_pretrained(folder)."
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys() if key.endswith(tuple(_RANK_DIMENSION))}
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is truncated or corrupt ({error}), e.g. cut short while being written or copied. Save the "
            "adapter again with model.save_pretrained(folder), or restore the file from a backup or the Hub."
        ) from None
    _check_ranks(weights, folder / CONFIG_NAME, shapes, config)


def _check_ranks(weights: Path, config_file: Path, shapes: dict[str, list[int]], config: Any) -> None:
    """Every saved lora_A / lora_B must have the rank the config gives its layer (`r`, or a `rank_pattern` entry)."""
    pattern = getattr(config, "rank_pattern", None) or {}
    for key, shape in sorted(shapes.items()):
        suffix = next(s for s in _RANK_DIMENSION if key.endswith(s))
        saved = shape[_RANK_DIMENSION[suffix]]
        layer = key[: -len(suffix)].removeprefix(_SAVED_PREFIX)
        matched = get_pattern_key(pattern.keys(), layer)
        expected = pattern.get(matched, config.r)
        if saved != expected:
            field = f"rank_pattern[{matched!r}]" if matched in pattern else "r"
            raise ValueError(
                f"{weights}: layer {layer} was saved with rank {saved} ({key} has shape {list(shape)}), but `{field}` "
                f"in {config_file} is {expected}: the config was edited by hand or belongs to another adapter. Set "
                f"`{field}` back to {saved}, or save the adapter again with model.save_pretrained(folder)."
            )
