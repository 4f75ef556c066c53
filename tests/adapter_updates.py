"""What a run learned, read from its saved adapters (imported by name: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def task_updates(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every finished task's update `B A` of every target, from the adapter of the run's last task."""
    adapter = sorted((run_dir / "tasks").iterdir())[-1] / "adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    return {k: tensors[k[: -len("lora_A")] + "lora_B"] @ tensors[k] for k in tensors if ".task" in k and k.endswith(".lora_A")}
