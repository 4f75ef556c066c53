"""Every compared method through one harness: a `Sequence` (tasks, general sets, a fresh base model, the budget),
the driver of each kind of method (sequential, joint, each task alone, zero-shot) and the summary over runs.

`keeplora-hf demo` builds its image, video and CLIP sequences (`keeplora_hf.demo`, `keeplora_hf.clip_demo`) and
hands them here, so every sequence runs every method the same way, resumes finished runs and reports alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Value, concatenate_datasets
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments

from .baselines import METHODS, Method
from .continual import ContinualRunner, ContinualTask, GeneralSet
from .continual.checkpoint import atomic_write_json, read_json
from .continual.metrics import METRIC_NAMES, compute_all
from .continual.report import to_jsonable, write_report
from .continual.run_dir import RESULTS_FILE
from .trainer import KeepLoRATrainer
from .tuner.model import KeepLoRAModel

logger = logging.getLogger(__name__)

__all__ = ["Budget", "Sequence", "SUMMARY_COLUMNS", "run_sequence", "summarize", "summary_markdown"]


@dataclass(frozen=True)
class Budget:
    """What every method gets on a sequence: the same adapter size, optimiser steps and base dtype."""

    epochs: float
    batch_size: int
    learning_rate: float
    rank: int
    alpha: float
    dtype: str = "float32"


@dataclass
class Sequence:
    """One continual benchmark: its tasks, general sets, collator, how to get a fresh pre-trained base model, the
    targets and budget of every method, and what decides its runs (`recorded`: a finished run made with other values
    is refused, not reused).

    `trainer_kwargs` go to every Trainer (CLIP's `compute_loss_func`), `keeplora_kwargs` to KeepLoRA's alone (its
    statistics' `keeplora_loss_fn`); `classifier_heads` wraps a sequential method's per-task Trainer factory for the
    methods that train per-task heads (KeepLoRA++cls), None where the sequence has no classifier.
    """

    name: str
    tasks: list[ContinualTask]
    general: list[GeneralSet]
    collator: Callable
    load_base: Callable[[], nn.Module]
    budget: Budget
    targets: str
    recorded: dict[str, Any]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    keeplora_kwargs: dict[str, Any] = field(default_factory=dict)
    classifier_heads: Callable[[Callable[..., Trainer]], Callable[..., Trainer]] | None = None
    one_task_batches: bool = False  # a batch must hold one task's rows (CLIP scores them against its class prompts)

    def supports(self, method: Method) -> bool:
        return not method.classifier_heads or self.classifier_heads is not None


def run_sequence(sequence: Sequence, methods: tuple[str, ...], seed: int, out: Path, *, overwrite: bool = False,
                 config: dict[str, Any] | None = None, finished_only: bool = False) -> dict[str, Any]:
    """Every method of `methods` the sequence supports on one seed, finished runs reused; results and plots in `out`.

    `finished_only` runs nothing: the methods with a finished run are collected (a summary of what is there)."""
    results: dict[str, Any] = {
        "tasks": [t.name for t in sequence.tasks], "methods": {}, "config": config or {}, "seed": seed,
    }
    for name in methods:
        if not sequence.supports(METHODS[name]):
            logger.info("%s: skipped on the %s sequence, which has no classifier heads", name, sequence.name)
            continue
        if finished_only:
            if not (out / _slug(name) / RESULTS_FILE).exists():
                continue
            entry = _finished(out / _slug(name), sequence.recorded)
        else:
            entry = _run_method(METHODS[name], sequence, seed, out / _slug(name), overwrite)
        results["methods"][name] = entry["methods"][name]
        results["versions"] = entry.get("versions", {})
    write_report(results, out)
    return results


def _run_method(method: Method, sequence: Sequence, seed: int, out: Path, overwrite: bool) -> dict[str, Any]:
    if (out / RESULTS_FILE).exists() and not overwrite:
        return _finished(out, sequence.recorded)
    budget = sequence.budget
    base = sequence.load_base().to(getattr(torch, budget.dtype))
    tasks, general = sequence.tasks, sequence.general
    config = {"demo": sequence.recorded}
    if method.kind == "none":
        return _zero_shot(method, base, tasks, general, out, config)
    if method.kind == "single":
        return _single_task(method, base, sequence, seed, out, config)
    torch.manual_seed(seed)
    model = get_peft_model(base, method.make_config(budget.rank, budget.alpha, sequence.targets, base))
    args = _training_args(budget, seed, out / "trainer")
    if method.kind == "joint":
        return _joint(method, model, sequence, args, out, config)
    keeplora = isinstance(model.base_model, KeepLoRAModel)
    trainer_kwargs = {**sequence.trainer_kwargs, **(sequence.keeplora_kwargs if keeplora else {})}
    trainer_class = None
    if method.classifier_heads:
        trainer_class = sequence.classifier_heads(KeepLoRATrainer if keeplora else Trainer)
    runner = ContinualRunner(
        model, tasks, args, out, general_sets=general, data_collator=sequence.collator, method=method.name,
        run_config=config, overwrite=overwrite, trainer_kwargs=trainer_kwargs, trainer_class=trainer_class,
    )
    return runner.run()


def _finished(out: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """A finished run's results, refused when it was run with other settings: a changed flag must not be ignored."""
    results = read_json(out / RESULTS_FILE)
    before = (results.get("config") or {}).get("demo", {})
    current = to_jsonable(recorded)
    differing = sorted(k for k in before.keys() & current.keys() if before[k] != current[k])
    if differing:
        raise ValueError(
            f"{out} holds a finished run with other settings (differs in: {', '.join(differing)}); pass --overwrite "
            "to replace it, or choose another --output-dir"
        )
    return results


def _training_args(budget: Budget, seed: int, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=budget.epochs,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=10,
        save_strategy="epoch",
        report_to=["tensorboard"],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )


def _evaluate_all(model, tasks, general) -> tuple[list[float], dict[str, float]]:
    model.eval()
    return [t.metric(model, t.eval_dataset) for t in tasks], {g.name: g.metric(model, g.eval_dataset) for g in general}


# A joint run has no sequence, only rows 0 and T: the metrics of a sequence (plasticity, forgetting, ...) are undefined
JOINT_METRICS = ("last", "mfn", "general_retention")


def _entry(
    method: Method,
    matrix: list[list[float | None]],
    general: dict[str, list],
    out: Path,
    config: dict[str, Any],
    defined: tuple[str, ...] = METRIC_NAMES,
) -> dict[str, Any]:
    metrics = compute_all(np.array(matrix, dtype=float), general)
    results = {
        "tasks": None,
        "config": config,
        "methods": {
            method.name: {
                "accuracy_matrix": matrix,
                "general": general,
                "metrics": {k: (v if k in defined else None) for k, v in metrics.items()},
                "timings_s": {},
            }
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_FILE, to_jsonable(results))
    return results


def _zero_shot(method, model, tasks, general, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The untouched model: every row of its matrix is the same evaluation."""
    row, kept = _evaluate_all(model, tasks, general)
    rows = len(tasks) + 1
    return _entry(method, [row] * rows, {k: [v] * rows for k, v in kept.items()}, out, config)


def _joint(method, model, sequence: Sequence, args, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """All tasks' data at once: an upper bound with no sequence, so only rows 0 and T are defined."""
    tasks, general = sequence.tasks, sequence.general
    before, kept_before = _evaluate_all(model, tasks, general)
    if sequence.one_task_batches:  # whole batches of one task, in a seeded order the Trainer keeps
        union = _task_blocks(tasks, args.per_device_train_batch_size, args.seed)
        args = replace(args, train_sampling_strategy="sequential")
    else:
        union = concatenate_datasets([t.train_dataset for t in tasks]).shuffle(seed=args.seed)
    Trainer(model=model, args=args, train_dataset=union, data_collator=sequence.collator,
            **sequence.trainer_kwargs).train()
    after, kept_after = _evaluate_all(model, tasks, general)
    gap = [None] * len(tasks)
    matrix = [before] + [gap] * (len(tasks) - 1) + [after]
    kept = {k: [kept_before[k]] + [None] * (len(tasks) - 1) + [kept_after[k]] for k in kept_before}
    return _entry(method, matrix, kept, out, config, defined=JOINT_METRICS)


def _task_blocks(tasks: list[ContinualTask], batch_size: int, seed: int):
    """All tasks' rows as whole single-task batches in a seeded random order of batches (a task's last rows that do not
    fill a batch are left out, so that no batch straddles two tasks)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for t in tasks:
        rows = t.train_dataset
        if isinstance(rows.features.get("label"), ClassLabel):  # each task its own classes: plain indices align
            rows = rows.cast_column("label", Value("int64"))
        order = rng.permutation(len(rows))
        blocks += [(rows, order[i : i + batch_size]) for i in range(0, len(order) - batch_size + 1, batch_size)]
    return concatenate_datasets([d.select(rows) for d, rows in (blocks[i] for i in rng.permutation(len(blocks)))])


def _single_task(method: Method, base: nn.Module, sequence: Sequence, seed: int, out: Path,
                 config: dict[str, Any]) -> dict[str, Any]:
    """Each task learned alone from the pre-trained model `base`, with the sequence's budget: row T holds what each
    task reaches on its own (the per-task upper bound a sequence is read against), row 0 the pre-trained model."""
    budget = sequence.budget
    before, kept = _evaluate_all(base, sequence.tasks, sequence.general)
    alone = []
    for index, task in enumerate(sequence.tasks):
        torch.manual_seed(seed)
        base = sequence.load_base().to(getattr(torch, budget.dtype))
        model = get_peft_model(base, method.make_config(budget.rank, budget.alpha, sequence.targets, base))
        args = _training_args(budget, seed, out / "trainer" / f"{index:03d}_{_slug(task.name)}")
        Trainer(model=model, args=args, train_dataset=task.train_dataset, data_collator=sequence.collator,
                **sequence.trainer_kwargs).train()
        model.eval()
        alone.append(task.metric(model, task.eval_dataset))
    tasks = len(sequence.tasks)
    matrix = [before] + [[None] * tasks] * (tasks - 1) + [alone]
    general = {k: [v] + [None] * tasks for k, v in kept.items()}
    return _entry(method, matrix, general, out, config, defined=("last",))


def summarize(per_run: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the runs (seeds, or (order, seed) pairs) of every metric, per method."""
    methods = {}
    names = dict.fromkeys(name for run in per_run.values() for name in run["methods"])
    for name in names:
        values = {k: [run["methods"][name]["metrics"][k] for run in per_run.values() if name in run["methods"]]
                  for k in METRIC_NAMES}
        methods[name] = {
            k: {"mean": _nanstat(np.nanmean, v), "std": _nanstat(np.nanstd, v), "n": int(np.sum(~np.isnan(np.array(v, dtype=float))))}
            for k, v in values.items()
        }
    runs = [run if isinstance(run, int) else f"order{run[0]}/seed{run[1]}" for run in per_run]
    return {"seeds": runs, "methods": methods}


def _nanstat(fn, values: list[float | None]) -> float:
    array = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(fn(array)) if np.any(~np.isnan(array)) else float("nan")


# The README's columns: metric key -> header
SUMMARY_COLUMNS = {
    "mft": "MFT (plasticity)", "last": "Last", "avg": "Avg", "maa": "MAA", "bwt": "BWT", "forgetting": "forgetting",
    "transfer": "transfer", "general_retention": "general retention",
}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The README's tables: one per sequence, metrics in %, mean ± std over the seeds that define them."""
    lines = []
    for name, sequence in summary["sequences"].items():
        lines += [
            f"### {name} sequence — seeds {', '.join(map(str, sequence['seeds']))} (mean ± std, %)",
            "",
            "| method | seeds | " + " | ".join(SUMMARY_COLUMNS.values()) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in SUMMARY_COLUMNS) + " |",
        ]
        for method, metrics in sequence["methods"].items():
            cells = []
            for key in SUMMARY_COLUMNS:
                m = metrics[key]
                cells.append("–" if np.isnan(m["mean"]) else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}")
            seeds = max(metrics[key]["n"] for key in SUMMARY_COLUMNS)
            lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
