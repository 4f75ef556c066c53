"""The task-sequence runner: begin, train, end and evaluate every task, with checkpoints and resume."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..callback import KeepLoRACallback, join_adapter_save
from ..sharding import has_partitioned_parameters, is_fully_sharded
from ..trainer import KeepLoRATrainer
from ..tuner.model import KeepLoRAModel
from .checkpoint import (
    LOCK_FILES,
    RunLock,
    atomic_directory,
    atomic_write_json,
    complete_trainer_checkpoint,
    read_json,
)
from .report import terminal_summary, write_report
from .run_dir import ADAPTER_DIR, RunLayout, check_task_name, current_versions, describe_run, run_results

logger = logging.getLogger(__name__)

Metric = Callable[[nn.Module, Any], float]


@dataclass
class ContinualTask:
    """One task of a sequence: data to learn from, data to be judged on, and how to judge (accuracy in [0, 1])."""

    name: str
    train_dataset: Any
    eval_dataset: Any
    metric: Metric

    def __post_init__(self) -> None:
        check_task_name(self.name)


@dataclass
class GeneralSet:
    """A held-out set of what the pre-trained model already knew; never trained on, evaluated after every task."""

    name: str
    eval_dataset: Any
    metric: Metric


class ContinualRunner:
    """Runs a task sequence on a fresh `PeftModel` and writes everything to `output_dir`.

    A KEEPLORA model is trained with `KeepLoRATrainer` (begin, train, end per task); any other PEFT model (a
    baseline such as OSF) with the plain `Trainer`, its adapter carried from task to task. `trainer_class` (a
    Trainer class or factory, called like `Trainer(model=, args=, train_dataset=, data_collator=, **trainer_kwargs)`,
    e.g. TRL's `SFTTrainer`) replaces them; a `KeepLoRACallback` is attached to it unless it has one.

    `output_dir` is laid out as `keeplora_hf.continual.run_dir` says: `run.json` (what the run is, to refuse mixing
    runs), one accuracy row and one adapter per task, the Trainer's own checkpoints, then `results.json`, the plots
    and `report.md`. Every directory and JSON file is written atomically, so running the same command again after an
    interruption continues from the last completed step and never trusts a half write. To continue a saved or pushed
    run, or push the result to the Hub, see `keeplora_hf.hub.continue_from` and `keeplora_hf.hub.run_and_push`.
    """

    def __init__(
        self,
        model: PeftModel,
        tasks: Sequence[ContinualTask],
        args: TrainingArguments,
        output_dir: str | Path,
        *,
        general_sets: Sequence[GeneralSet] = (),
        data_collator: Callable | None = None,
        method: str = "keeplora++",
        run_config: dict[str, Any] | None = None,
        overwrite: bool = False,
        trainer_kwargs: dict[str, Any] | None = None,
        trainer_class: Callable[..., Trainer] | None = None,
    ) -> None:
        self.model = model
        self.tasks = list(tasks)
        self.general_sets = list(general_sets)
        self.args = args
        self.output_dir = Path(output_dir)
        self.layout = RunLayout(self.output_dir, tuple(t.name for t in self.tasks))
        self.data_collator = data_collator
        self.method = method
        self.trainer_kwargs = trainer_kwargs or {}
        self.trainer_class = trainer_class
        self.state = PartialState()
        if not isinstance(model, PeftModel):
            raise TypeError(f"ContinualRunner needs a PeftModel (get_peft_model(base, config)), got {type(model).__name__}")
        if has_partitioned_parameters(model):
            raise ValueError(
                "the model's weights are already partitioned by DeepSpeed ZeRO-3 (zero.Init at load): the runner "
                "evaluates the pre-trained model before the first train(), when DeepSpeed has no hooks yet to gather "
                "them for a forward. Load it whole (accelerate config `zero3_init_flag: false`, or inside "
                "keeplora_hf.recipes.loaded_whole(training_args)); DeepSpeed partitions it at the first train()."
            )
        self.keeplora = isinstance(model.base_model, KeepLoRAModel)
        self.adapter = model.active_adapter
        self.learned = 0  # tasks learned so far, restored by resume
        _validate_tasks(self.tasks, self.general_sets)
        self.run_config = describe_run(
            method, self.tasks, [g.name for g in self.general_sets], model.peft_config[self.adapter].to_dict(), args,
            run_config or {},
        )
        self._lock = RunLock(self.output_dir)
        if self.state.is_main_process:
            self._lock.acquire()  # released at the end of run(), or when this process ends
        self._claim_output_dir(overwrite)

    # -- public -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Learn every task not yet learned, evaluate after each, and return (and write) the results."""
        try:
            return self._run()
        finally:
            self._lock.release()

    def _run(self) -> dict[str, Any]:
        rows = self._resume()
        if 0 not in rows:
            rows[0] = self._evaluate_row(0, {})
            self._write_row(0, rows[0])
        for index, task in enumerate(self.tasks, start=1):
            if index in rows:
                continue
            timings = self._learn(index, task)
            rows[index] = self._evaluate_row(index, timings)
            self._write_row(index, rows[index])
        results = run_results(
            [t.name for t in self.tasks], self.method, [g.name for g in self.general_sets],
            [rows[i] for i in range(len(self.tasks) + 1)], config=self.run_config, seed=self.args.seed,
            versions=current_versions(),
        )
        if self.state.is_main_process:
            write_report(results, self.output_dir)
            print(terminal_summary(results))
        self.state.wait_for_everyone()
        return results

    # -- one task ---------------------------------------------------------------------------------------------

    def _learn(self, index: int, task: ContinualTask) -> dict[str, float]:
        trainer_dir = self.layout.trainer_dir(index)
        args = dataclasses.replace(self.args, output_dir=str(trainer_dir))
        trainer_class = self.trainer_class or (KeepLoRATrainer if self.keeplora else Trainer)
        trainer = trainer_class(
            model=self.model,
            args=args,
            train_dataset=task.train_dataset,
            data_collator=self.data_collator,
            **self.trainer_kwargs,
        )
        callback = _keeplora_callback(trainer) if self.keeplora else None
        checkpoint = _last_complete_checkpoint(trainer_dir)
        if checkpoint is not None:
            logger.info("task %s: resuming from the Trainer checkpoint %s", task.name, checkpoint)
            if self.keeplora and trainer.is_deepspeed_enabled:
                # DeepSpeed restores the optimizer and the trained weights, not the KeepLoRA state of the task under
                # way (nor a frozen `A`): they come from the checkpoint's adapter, loaded before DeepSpeed partitions
                self.model.load_adapter(str(checkpoint), self.adapter, is_trainable=True)
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except (OSError, RuntimeError) as error:
            # torch.save reports a full disk as "enforce fail at inline_container.cc"; say what it is and where
            if not (isinstance(error, OSError) and error.errno == errno.ENOSPC) and "inline_container" not in str(error):
                raise
            raise OSError(
                errno.ENOSPC,
                f"writing a checkpoint under {trainer_dir} failed, most likely a full disk ({error}). Free space and "
                "run the same command again: the run resumes from its last complete checkpoint",
            ) from error
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        if callback is not None:
            callback.end_task(trainer)
        end_s = time.perf_counter() - start
        self.learned = index
        if self.state.is_main_process:
            with atomic_directory(self.layout.task_dir(index)) as staging:
                self.model.save_pretrained(str(staging / ADAPTER_DIR))
        elif is_fully_sharded(self.model):  # the gathers of a sharded adapter need every rank; only the main one writes
            join_adapter_save(self.model)
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            for stale in trainer_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        begin_s = callback.begin_seconds if callback is not None else 0.0  # inside trainer.train(), reported apart
        return {"train": train_s - begin_s, "task_boundary": begin_s + end_s}

    def _evaluate_row(self, index: int, timings: dict[str, float]) -> dict[str, Any]:
        start = time.perf_counter()
        label = "before any task" if index == 0 else f"after {self.tasks[index - 1].name}"
        accuracies = []
        evaluations = [(t.name, t.eval_dataset, t.metric) for t in self.tasks] + [
            (g.name, g.eval_dataset, g.metric) for g in self.general_sets
        ]
        self.model.eval()
        values = {}
        for name, dataset, metric in tqdm(
            evaluations, desc=f"Evaluating {label}", disable=not self.state.is_main_process
        ):
            values[name] = _checked_metric(name, metric(self.model, dataset))
        accuracies = [values[t.name] for t in self.tasks]
        general = {g.name: values[g.name] for g in self.general_sets}
        return {
            "row": index,
            "accuracies": accuracies,
            "general": general,
            "timings_s": {**timings, "eval": time.perf_counter() - start},
        }

    # -- output directory and resume --------------------------------------------------------------------------

    def _claim_output_dir(self, overwrite: bool) -> None:
        run_file = self.layout.run_file
        replace = False
        if run_file.exists():
            saved = read_json(run_file)
            if saved != json.loads(json.dumps(self.run_config)):
                if not overwrite:
                    changed = sorted(k for k in set(saved) | set(self.run_config) if saved.get(k) != self.run_config.get(k))
                    raise ValueError(
                        f"{self.output_dir} holds a run with a different configuration (differs in: "
                        f"{', '.join(changed)}); pass overwrite=True (--overwrite) to replace it, or choose another "
                        "output directory"
                    )
                replace = True
        elif self.output_dir.exists() and any(p.name not in LOCK_FILES for p in self.output_dir.iterdir()) and not overwrite:
            raise ValueError(f"{self.output_dir} is not empty and holds no KeepLoRA run; choose an empty directory")
        self.state.wait_for_everyone()  # every rank has judged the directory before the main process changes it
        if self.state.is_main_process:
            if replace:  # everything but the lock this runner holds
                for entry in self.output_dir.iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    elif entry.name not in LOCK_FILES:
                        entry.unlink()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not run_file.exists():
                atomic_write_json(run_file, self.run_config)
        self.state.wait_for_everyone()

    def _resume(self) -> dict[int, dict[str, Any]]:
        """Rows already written, with the model restored to the last completed task."""
        rows: dict[int, dict[str, Any]] = {}
        if self.layout.row_file(0).exists():
            rows[0] = read_json(self.layout.row_file(0))
        last_adapter = None
        for index in range(1, len(self.tasks) + 1):
            if self.layout.adapter_dir(index).exists():
                last_adapter = index
            elif not self.layout.row_file(index).exists():
                break
            # a task dir with only row.json was learned; a later adapter carries its state (a run seeded from the Hub)
            if self.layout.row_file(index).exists():
                rows[index] = read_json(self.layout.row_file(index))
        if last_adapter is not None:
            if self.keeplora and (self.model.base_model.progress(self.adapter).task_index or self.learned):
                raise ValueError("resuming needs a fresh model: this one has already learned tasks")
            logger.info("resuming after %s", self.layout.slug(last_adapter))
            self.model.load_adapter(str(self.layout.adapter_dir(last_adapter)), self.adapter, is_trainable=True)
            self.learned = last_adapter
        done = self.learned
        orphans = [i for i in rows if i > done]
        if orphans:
            raise RuntimeError(
                f"{self.layout.task_dir(orphans[0])} has a row.json, but neither it nor a later task has an adapter: "
                "the run directory is inconsistent"
            )
        missing = [i for i in range(1, done + 1) if i not in rows]
        for index in missing:  # interrupted during evaluation: the task is learned, only its row is missing
            if index != done:
                raise RuntimeError(
                    f"{self.layout.task_dir(index)} has an adapter but no row.json, yet later tasks exist"
                )
            rows[index] = self._evaluate_row(index, {})
            self._write_row(index, rows[index])
        return rows

    def _write_row(self, index: int, row: dict[str, Any]) -> None:
        if self.state.is_main_process:
            atomic_write_json(self.layout.row_file(index), row)
        self.state.wait_for_everyone()


def _validate_tasks(tasks: list[ContinualTask], general_sets: list[GeneralSet]) -> None:
    if not tasks:
        raise ValueError("the task sequence is empty")
    names = [t.name for t in tasks] + [g.name for g in general_sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task and general-set names must be unique; repeated: {duplicates}")
    for task in tasks:
        check_task_name(task.name)  # again: the name may have been changed since the task was made
        if not callable(task.metric):
            raise ValueError(f"task {task.name!r}: metric must be a callable (model, eval_dataset) -> float")
        for role, dataset in (("train", task.train_dataset), ("eval", task.eval_dataset)):
            if dataset is None or len(dataset) == 0:
                raise ValueError(f"task {task.name!r}: the {role} dataset is empty")
        _check_rows_complete(task.name, task.eval_dataset)
    for general in general_sets:
        if general.eval_dataset is None or len(general.eval_dataset) == 0:
            raise ValueError(f"general set {general.name!r}: the eval dataset is empty")
        _check_rows_complete(general.name, general.eval_dataset)


def _check_rows_complete(name: str, dataset: Any) -> None:
    """Every eval row must carry every field, so a metric never meets a hole halfway through a long run."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        for column in columns:
            for row, value in enumerate(dataset[column]):
                if value is None:
                    raise ValueError(f"{name!r} eval set: row {row} has no value for field {column!r}")
        return
    rows = list(dataset)
    if rows and isinstance(rows[0], dict):
        fields = set().union(*(r.keys() for r in rows))
        for row, record in enumerate(rows):
            for column in sorted(fields):
                if record.get(column) is None:
                    raise ValueError(f"{name!r} eval set: row {row} has no value for field {column!r}")


def _checked_metric(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the metric of {name!r} returned {value!r}, not a number") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"the metric of {name!r} returned {number}, not an accuracy in [0, 1]")
    return number


def _keeplora_callback(trainer: Trainer) -> KeepLoRACallback:
    """The trainer's `KeepLoRACallback`, attached now if it has none (a plain Trainer or TRL's from a factory)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, KeepLoRACallback):
            return callback
    callback = KeepLoRACallback()
    trainer.add_callback(callback)
    return callback


def _last_complete_checkpoint(trainer_dir: Path) -> Path | None:
    candidates = sorted(
        (p for p in trainer_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    return next((p for p in candidates if complete_trainer_checkpoint(p)), None)
