"""Apply a LoRA folder the way vLLM's and SGLang's loaders do, to check an export before serving it.

Those loaders read only `r`, `lora_alpha`, `target_modules` and `use_rslora` from `adapter_config.json` (vLLM's
`PEFTHelper.from_dict`) and add `lora_alpha / r * B A x` (`/ sqrt(r)` with rsLoRA) to every targeted layer's output;
`rank_pattern`, `alpha_pattern` and the rest are dropped without a word. `apply_like_a_server(base, folder)` does
exactly that with forward hooks, so `model(**batch)` shows what a server would compute.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

#: the adapter_config.json fields a vLLM / SGLang LoRA loader reads
SERVER_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora")


def apply_like_a_server(base: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Hook the LoRA in `folder` onto `base` (changed in place and returned) as a server's loader applies it."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    tensors = load_file(folder / "adapter_model.safetensors")
    for key, lora_A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = base.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
            module.register_forward_hook(_lora_hook(lora_A, tensors[key.replace(".lora_A.", ".lora_B.")], scale))
    return base


def _lora_hook(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
    def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        delta = scale * (x @ lora_A.T.to(x.device)) @ lora_B.T.to(x.device)
        return (output.float() + delta).to(output.dtype)

    return add
