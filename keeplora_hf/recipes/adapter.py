"""The recipe's adapter: its `keeplora:` section as a `KeepLoRAConfig`, and targets with their own epsilon_w."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from peft import PeftModel

from ..tuner.lifecycle import first_task_state
from ..tuner.config import KeepLoRAConfig
from ..tuner.layer import layer_state, set_layer_state
from ..tuner.model import keeplora_layers, tuner_of

__all__ = ["keeplora_config", "seed_principal_energy"]


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
    seeded = []
    for name, module in keeplora_layers(model, adapter).items():
        energy = next((e for regex, e in pattern.items() if re.search(regex, name)), None)
        if energy is None or layer_state(module, adapter).initialised:  # (never `.principal`: it may recompute)
            continue
        set_layer_state(module, adapter, first_task_state(module, config, energy))
        seeded.append(name)
    if not seeded and tuner.progress(adapter).task_index == 0:
        raise ValueError(f"keeplora.principal_energy_pattern {pattern} matches no KeepLoRA target")
    return seeded
