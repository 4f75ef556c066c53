"""Continual learning over a task sequence: the runner, its metrics, checkpoints and reports."""

from .runner import ContinualRunner, ContinualTask, GeneralSet

__all__ = ["ContinualRunner", "ContinualTask", "GeneralSet"]
