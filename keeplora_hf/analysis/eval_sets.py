"""The eval sets an analysis scores the model on, and what their accuracies are summed up into.

A measurement is every set's accuracy after one intervention, with the general and task means; retention is the
share of the knowledge above chance that survives. The measurements, the recommendation and the report all read
them this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "MIN_KNOWLEDGE",
    "EvalSet",
    "aggregate",
    "as_eval_set",
    "chance_mean",
    "energy_key",
    "evaluate",
    "first_item",
    "mean",
    "measurement",
    "precollated_eval_set",
    "retention",
]

# a set "knows" something when its accuracy is this far above chance (and above 2 standard errors)
MIN_KNOWLEDGE = 0.05


@dataclass
class EvalSet:
    """What one eval set needs: the data, `metric(model, dataset) -> accuracy in [0, 1]`, its chance level and size.

    `chance` is the accuracy of guessing (a destroyed model still gets it): retention is measured above it.
    `size` is the number of samples, for standard errors; `len(dataset)` when not given.
    """

    dataset: Any
    metric: Callable[[nn.Module, Any], float]
    chance: float = 0.0
    size: int | None = None

    def samples(self) -> int:
        if self.size is not None:
            return self.size
        try:
            return len(self.dataset)
        except TypeError:
            return 0


def as_eval_set(value: Any) -> EvalSet:
    if isinstance(value, EvalSet):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return EvalSet(*value)
    raise TypeError("an eval set is an EvalSet or a tuple (dataset, metric) / (dataset, metric, chance)")


def precollated_eval_set(rows: Sequence[Any], collator: Callable, chance: float = 0.0, batch_size: int = 64) -> EvalSet:
    """An exact-match eval set whose batches are collated once, not again at each of the analysis' evaluations.

    The metric is `continual.evaluation.answer_exact_match` itself, run over the ready batches.
    """
    from ..continual.evaluation import answer_exact_match

    batches = [collator(list(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    metric = answer_exact_match(collator=first_item, batch_size=1)
    return EvalSet(batches, metric, chance=chance, size=len(rows))


def first_item(items: list[Any]) -> Any:
    """The collator of data that holds ready batches, one at a time."""
    return items[0]


def evaluate(model: nn.Module, eval_sets: Mapping[str, EvalSet]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return {name: float(s.metric(model, s.dataset)) for name, s in eval_sets.items()}


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(accuracy: Mapping[str, float], names: Sequence[str]) -> float | None:
    """Mean accuracy over `names` (e.g. the general sets)."""
    return mean([accuracy[n] for n in names if n in accuracy])


def measurement(accuracy: Mapping[str, float], general: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    return {"accuracy": dict(accuracy), "general_mean": aggregate(accuracy, general), "task_mean": aggregate(accuracy, tasks)}


def retention(value: float | None, base: float | None, chance: float) -> float | None:
    """Share of the knowledge above chance that survives: `(value - chance) / (base - chance)`; None if base ~ chance."""
    if value is None or base is None or base - chance < MIN_KNOWLEDGE:
        return None
    return (value - chance) / (base - chance)


def chance_mean(chances: Mapping[str, float], names: Sequence[str]) -> float:
    return mean([chances.get(n, 0.0) for n in names]) or 0.0


def energy_key(energy: float) -> str:
    """How an energy (or a noise scale) keys the measurements made at it: `0.6` -> "0.6"."""
    return f"{energy:g}"
