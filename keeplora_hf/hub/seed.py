"""New directories from a saved or pushed run: a run directory that continues it (`seed_run_dir`, `continue_from`),
and the plain LoRA of its first tasks (`export_run`)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from torch import nn

from ..continual.checkpoint import atomic_directory, atomic_write_json
from ..continual.run_dir import ADAPTER_FILES, RUN_FILE, RunInfo, RunLayout, data_fingerprint
from ..export import check_export_target
from .load import export_after, load_run
from .repo import open_run

logger = logging.getLogger(__name__)


def seed_run_dir(
    run_or_repo: str | os.PathLike | RunInfo,
    new_output_dir: str | os.PathLike,
    tasks: Sequence[Any] | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Start `new_output_dir` from a saved or pushed run, so `ContinualRunner` resumes there and learns what follows.

    `tasks` is the new sequence (`ContinualTask`s): the source's tasks, in order and with the same training data,
    then the tasks to append. The run description (`run.json`) is extended to it and the earlier accuracy rows get
    empty cells for the appended tasks (those models are gone), so a runner given the same model config, training
    arguments and `tasks` accepts the directory, restores the last learned task and learns the rest: the result
    equals continuing the original run. Without `tasks` the run is copied as it is (to resume or push elsewhere).
    The directory is written whole or not at all; the source is only read.
    """
    info = open_run(run_or_repo, revision=revision, token=token)
    out = Path(new_output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not empty: seed a run into a new or empty directory")
    config = copy.deepcopy(info.config)
    appended = 0
    if tasks is not None:
        config, appended = _extended_config(info, tasks)
    with atomic_directory(out) as staging:
        layout = RunLayout(staging, tuple(config["tasks"]))
        atomic_write_json(layout.run_file, config)
        for index in range(0, info.learned + 1):
            row = copy.deepcopy(info.rows[index])
            row["accuracies"] = list(row["accuracies"]) + [None] * appended
            atomic_write_json(layout.row_file(index), row)
        for index, adapter in info.adapters.items():
            copy_to = layout.adapter_dir(index)
            copy_to.mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, copy_to / name)
        atomic_write_json(layout.seed_file, {"source": info.source, "learned": info.learned, "tasks": info.tasks})
    logger.info("seeded %s from %s (%d tasks learned, %d appended)", out, info.source, info.learned, appended)
    return out


def continue_from(
    run_or_repo: str | os.PathLike | RunInfo,
    output_dir: str | os.PathLike,
    tasks: Sequence[Any],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """`output_dir`, seeded from a saved or pushed run for a `ContinualRunner` given `tasks` (its tasks, then new ones).

    The first call seeds the directory (`seed_run_dir`); once it holds a run, it is left as it is, so the same command
    resumes an interrupted continuation. Only the main process writes; every process returns once the directory is
    ready. `ContinualRunner(model, tasks, args, continue_from(source, out, tasks))` then restores the source's last
    state and learns the appended tasks.
    """
    out = Path(output_dir)
    state = PartialState()
    if state.is_main_process and not (out / RUN_FILE).exists():
        seed_run_dir(run_or_repo, out, tasks, revision=revision, token=token)
    state.wait_for_everyone()
    return out


def export_run(
    run_or_repo: str | os.PathLike | RunInfo,
    out: str | os.PathLike,
    *,
    after_task: int | None = None,
    base_model: nn.Module | str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    overwrite: bool = False,
    merged: bool = False,
    language_model_only: bool = False,
) -> Path:
    """Write the plain LoRA of the first `after_task` tasks (default: all learned), rank `after_task * r` (or, with
    `merged` / `language_model_only`, the exports of `keeplora_hf.export` of the same name, with the tokenizer and
    processor files of a local base-model folder).

    Rebuilt from the adapter after that task when the run keeps it; otherwise from the last adapter, whose state
    holds every finished task's update exactly, keeping only the first `after_task` of them. `out` must not be the
    run, inside it or hold it; an `out` that is not empty is refused unless `overwrite`.
    """
    info = open_run(run_or_repo, revision=revision, token=token)
    target, run = Path(out).resolve(), info.root.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise ValueError(f"export target {out} is the run {info.source}, inside it or around it; choose another directory")
    check_export_target(target, overwrite)  # before the model is rebuilt, which may take minutes
    index = info.checked_task(after_task)
    source = index if index in info.adapters else info.learned
    model = load_run(info, base_model, after_task=source, is_trainable=False)
    recorded = model.peft_config[model.active_adapter].base_model_name_or_path
    source_folder = base_model if isinstance(base_model, (str, os.PathLike)) else recorded
    return export_after(
        model, index, Path(out), overwrite, merged=merged, language_model_only=language_model_only,
        processor_from=source_folder,
    )


def _extended_config(info: RunInfo, tasks: Sequence[Any]) -> tuple[dict[str, Any], int]:
    """run.json for `tasks` = the source's tasks (same data) + appended ones, as the runner will describe it."""
    names = [getattr(t, "name", None) for t in tasks]
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError("tasks must be ContinualTask objects (with a name and a train_dataset)")
    old = info.tasks
    if names[: len(old)] != old:
        raise ValueError(
            f"the new task sequence must start with the source run's tasks {old}, in order, then add tasks; got {names}"
        )
    data = dict(info.config.get("data") or {})
    for task in tasks[: len(old)]:
        recorded = data.get(task.name)
        if recorded is not None and recorded != data_fingerprint(task.train_dataset):
            raise ValueError(
                f"task {task.name!r}: its training data differs from the one the source run learned (fingerprint "
                f"{data_fingerprint(task.train_dataset)} != {recorded}); pass the same data for the tasks already "
                "learned"
            )
    config = copy.deepcopy(info.config)
    config["tasks"] = names
    config["data"] = {**data, **{t.name: data_fingerprint(t.train_dataset) for t in tasks[len(old) :]}}
    return config, len(names) - len(old)
