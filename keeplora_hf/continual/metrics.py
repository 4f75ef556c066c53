"""Continual-learning metrics over an accuracy matrix, as reported by ZSCL/MTIL and the MLLM continual papers.

The accuracy matrix `R` has shape `(T + 1, T)`: row 0 is the model before any task (zero-shot), row `t` the model
after learning task `t`; column `i - 1` is task `i`. Values are fractions in [0, 1]; NaN means "not evaluated" and is
skipped by every mean, and a metric with no defined cell is NaN. In the docstrings below tasks and rows are 1-based,
as in the papers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import evaluate

METRIC_NAMES: tuple[str, ...] = (
    "transfer", "avg", "last", "mft", "mfn", "maa", "bwt", "fwt", "forgetting", "general_retention",
)
METRIC_DIR = Path(__file__).with_name("keeplora_metric")


def as_accuracy_matrix(matrix: Any) -> np.ndarray:
    """Check and convert once, so every metric can index rows and columns without guarding shapes itself.

    `None` (JSON null) becomes NaN.
    """
    try:
        R = np.array(matrix, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"accuracy matrix must hold numbers (or NaN/None), got {matrix!r}: {error}") from None
    if R.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (T+1 rows by T tasks), got shape {R.shape}")
    if R.shape[1] < 1:
        raise ValueError(f"accuracy matrix must have at least one task column, got shape {R.shape}")
    if R.shape[0] != R.shape[1] + 1:
        raise ValueError(f"accuracy matrix must have T+1 rows for T tasks, got shape {R.shape}")
    bad = np.argwhere(~np.isnan(R) & ((R < 0.0) | (R > 1.0) | ~np.isfinite(R)))
    if bad.size:
        row, column = (int(x) for x in bad[0])
        raise ValueError(
            f"accuracy matrix values must be fractions in [0, 1] or NaN, got {R[row, column]} at row {row}, "
            f"column {column} ({len(bad)} bad cell(s); percentages must be divided by 100)"
        )
    return R


def _mean(values: Iterable[float]) -> float:
    """nanmean without numpy's empty-slice warning: no defined value means an undefined metric, not an error."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def transfer(R: Any) -> float:
    """ZSCL transfer: accuracy on task i before learning it, rows 1..i-1, averaged over tasks i >= 2."""
    R = as_accuracy_matrix(R)
    return _mean(_mean(R[1:i, i - 1]) for i in range(2, R.shape[1] + 1))


def avg(R: Any) -> float:
    """ZSCL avg: every cell after each task, so it rewards transfer, learning and retention at once."""
    R = as_accuracy_matrix(R)
    return _mean(R[1:].ravel())


def last(R: Any) -> float:
    """ZSCL last: the final model on every task."""
    R = as_accuracy_matrix(R)
    return _mean(R[-1])


def mft(R: Any) -> float:
    """Mean fine-tuned accuracy: each task right after learning it, R[i, i] (plasticity)."""
    R = as_accuracy_matrix(R)
    return _mean(np.diagonal(R[1:]))


def mfn(R: Any) -> float:
    """Mean final accuracy R[T, i]; the MLLM papers' name for ZSCL's `last`."""
    R = as_accuracy_matrix(R)
    return _mean(R[-1])


def maa(R: Any) -> float:
    """Mean average accuracy: at each step t, the mean over tasks seen so far (i <= t), averaged over t."""
    R = as_accuracy_matrix(R)
    return _mean(_mean(R[t, :t]) for t in range(1, R.shape[0]))


def bwt(R: Any) -> float:
    """Backward transfer: R[T, i] - R[i, i] over i < T; negative means forgetting."""
    R = as_accuracy_matrix(R)
    T = R.shape[1]
    return _mean(R[T, i - 1] - R[i, i - 1] for i in range(1, T))


def fwt(R: Any) -> float:
    """Forward transfer: R[i-1, i] - R[0, i] over i >= 2, i.e. what earlier tasks gave task i over zero-shot."""
    R = as_accuracy_matrix(R)
    return _mean(R[i - 1, i - 1] - R[0, i - 1] for i in range(2, R.shape[1] + 1))


def forgetting(R: Any) -> float:
    """Chaudhry forgetting: best accuracy on task j after learning it (rows j..T-1) minus the final one, j < T."""
    R = as_accuracy_matrix(R)
    T = R.shape[1]
    drops = []
    for j in range(1, T):
        earlier = R[j:T, j - 1]
        drops.append(np.nanmax(earlier) - R[T, j - 1] if not np.isnan(earlier).all() else math.nan)
    return _mean(drops)


def general_retention(general: Mapping[str, Sequence[float | None]] | None) -> float:
    """How much held-out general ability survives: final / before-any-task, averaged over general sets.

    A set whose first or last value is missing (None/NaN) or whose first value is 0 has no ratio and is skipped.
    """
    ratios = []
    for values in (general or {}).values():
        if len(values) == 0:
            continue
        first, final = (math.nan if v is None else float(v) for v in (values[0], values[-1]))
        ratios.append(final / first if first != 0 and not math.isnan(first) else math.nan)
    return _mean(ratios)


def check_general(general: Mapping[str, Sequence[float | None]], rows: int) -> None:
    """General sets are evaluated with every matrix row, so a length mismatch means misaligned rows."""
    for name, values in general.items():
        if len(values) != rows:
            raise ValueError(f"general set {name!r} needs one value per matrix row ({rows}), got {len(values)}")
        for row, value in enumerate(values):
            try:
                number = math.nan if value is None else float(value)
            except (TypeError, ValueError):
                number = math.inf
            if not math.isnan(number) and not 0.0 <= number <= 1.0:
                raise ValueError(f"general set {name!r}: value {value!r} at row {row} is not a fraction in [0, 1]")


def compute_all(R: Any, general: Mapping[str, Sequence[float | None]] | None = None) -> dict[str, float]:
    """Every metric of METRIC_NAMES from one validated matrix, so a report never mixes inconsistent inputs."""
    R = as_accuracy_matrix(R)
    if general:
        check_general(general, R.shape[0])
    return {
        "transfer": transfer(R),
        "avg": avg(R),
        "last": last(R),
        "mft": mft(R),
        "mfn": mfn(R),
        "maa": maa(R),
        "bwt": bwt(R),
        "fwt": fwt(R),
        "forgetting": forgetting(R),
        "general_retention": general_retention(general),
    }


def load_metric(**load_kwargs: Any) -> evaluate.EvaluationModule:
    """The same metrics as an `evaluate` module, loaded from the package itself so it works offline.

    `load_kwargs` go to `evaluate.load`; the data is kept in memory unless `keep_in_memory=False` is passed.
    """
    import evaluate

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRIC_DIR), **load_kwargs)
