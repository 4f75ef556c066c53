"""Continual learning over a task sequence: the runner, its metrics, checkpoints and reports.

The runner loads on first use (PEP 562), so the light modules here (`checkpoint`, `run_dir`, `metrics`) import without
the runner's data and training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ContinualRunner", "ContinualTask", "GeneralSet"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".runner", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
