"""The one definition of a continual run directory: its layout, what `run.json` and the rows hold, and its results.

`ContinualRunner` writes it, `keeplora_hf.hub` pushes, seeds and reads it back, `export_lora` refuses to write over it:

    run.json                    what the run is (`describe_run`), to refuse mixing runs
    row_000.json                the accuracy row of the model before any task
    tasks/NNN_<name>/adapter/   the adapter after task NNN, with the whole continual state
    tasks/NNN_<name>/row.json   its accuracy row
    trainer/NNN_<name>/         the Trainer's mid-task checkpoints and logs
    results.json, plots, report.md   once the sequence is done (`report.write_report`)
    seeded_from.json            the run a seeded directory continues (`keeplora_hf.hub.seed_run_dir`)

A pushed repo holds the same record with its last adapter at the root instead of under tasks/; `read_run` reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from ..tuner.model import STATE_KEY
from ..tuner.peft_type import KEEPLORA_PEFT_TYPE
from .checkpoint import read_json
from .metrics import compute_all
from .report import RESULTS_FILE, to_jsonable

RUN_FILE = "run.json"
ROW_ZERO = "row_000.json"
TASKS_DIR = "tasks"
ROW_FILE = "row.json"
ADAPTER_DIR = "adapter"
TRAINER_DIR = "trainer"
SEED_FILE = "seeded_from.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINING_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "lr_scheduler_type", "warmup_steps", "seed", "max_grad_norm", "optim",
)


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run directory `root` for the task sequence `task_names` (task indices start at 1)."""

    root: Path
    task_names: tuple[str, ...]

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def results_file(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def seed_file(self) -> Path:
        return self.root / SEED_FILE

    def slug(self, index: int) -> str:
        return f"{index:03d}_{self.task_names[index - 1]}"

    def task_dir(self, index: int) -> Path:
        return self.root / TASKS_DIR / self.slug(index)

    def adapter_dir(self, index: int) -> Path:
        return self.task_dir(index) / ADAPTER_DIR

    def row_file(self, index: int) -> Path:
        """The accuracy row after task `index`; row 0 is the model before any task."""
        return self.root / ROW_ZERO if index == 0 else self.task_dir(index) / ROW_FILE

    def trainer_dir(self, index: int) -> Path:
        return self.root / TRAINER_DIR / self.slug(index)


#: a task's directory is `NNN_<name>`, and it is written through a staging directory `.staging-NNN_<name>.old.XXXXXXXX`
#: beside it: a name of this many UTF-8 bytes keeps that under the 255 bytes most file systems allow
MAX_TASK_NAME_BYTES = 200


def check_task_name(name: Any) -> None:
    """Refuse a task name that cannot name its directories, saying which rule it breaks: checked when the task is made,
    not when its first directory is written (after the zero-shot evaluation)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, got {name!r}")
    shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TASK_NAME_BYTES:
        problem = f"it is {size} bytes long in UTF-8, over the {MAX_TASK_NAME_BYTES} its directory name allows"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it holds a NUL byte or another control character"
    elif any(c in name for c in "/\\:") or name.startswith("."):
        problem = "it holds a path separator ('/', '\\' or ':') or starts with '.'"
    else:
        return
    raise ValueError(
        f"task name {shown} cannot name a directory: {problem}. Use a short name of letters, digits, '-' and '_'."
    )


# -- what run.json and results.json hold -------------------------------------------------------------------------


def describe_run(
    method: str,
    tasks: Sequence[Any],
    general_sets: Sequence[str],
    peft_config: Mapping[str, Any],
    args: Any,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """run.json: the method, the sequence (`ContinualTask`s) with a fingerprint of each task's training data, the
    held-out sets, the adapter config and the training arguments that decide the result, then `extra`."""
    return {
        "method": method,
        "tasks": [t.name for t in tasks],
        "general_sets": list(general_sets),
        "peft_config": json.loads(json.dumps(dict(peft_config), default=str, sort_keys=True)),
        "training": {k: _plain(getattr(args, k)) for k in TRAINING_KEYS},
        "data": {t.name: data_fingerprint(t.train_dataset) for t in tasks},
        **extra,
    }


def data_fingerprint(dataset: Any) -> str:
    """Size plus a hash of the first rows' plain values: stable across processes, unlike datasets' own fingerprint."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in sorted(value.items())}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "tolist"):
            return value.tolist()
        return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__

    head = [plain(dataset[i]) for i in range(min(len(dataset), 8))]
    return f"{len(dataset)}:{hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:16]}"


def run_results(
    tasks: Sequence[str],
    method: str,
    general_sets: Sequence[str],
    rows: Sequence[Mapping[str, Any] | None],
    *,
    config: Mapping[str, Any],
    seed: Any,
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """results.json of a run from its rows 0..T (None: not evaluated yet, its cells stay empty)."""
    matrix = [row["accuracies"] if row else [None] * len(tasks) for row in rows]
    general = {g: [(row.get("general") or {}).get(g) if row else None for row in rows] for g in general_sets}
    timings: dict[str, float] = {"train": 0.0, "task_boundary": 0.0, "eval": 0.0}
    for row in rows:
        for key, value in ((row or {}).get("timings_s") or {}).items():
            timings[key] = timings.get(key, 0.0) + float(value)
    metrics = compute_all(np.array(matrix, dtype=float), general or None)
    return {
        "tasks": list(tasks),
        "methods": {method: {"accuracy_matrix": matrix, "general": general, "metrics": metrics, "timings_s": timings}},
        "config": config,
        "seed": seed,
        "versions": dict(versions),
    }


def current_versions() -> dict[str, str]:
    """The versions results.json records: the run's outcome depends on them."""
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"keeplora_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


# -- reading a run back ------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """A validated continual run, from a run directory or a downloaded repo; nothing in it is ever written."""

    root: Path
    source: str
    config: dict[str, Any]
    rows: dict[int, dict[str, Any]]
    adapters: dict[int, Path]  # task index -> adapter directory (a pushed repo keeps only the last one)
    learned: int
    adapter_config: dict[str, Any]
    results: dict[str, Any] | None = None  # the runner's results.json, when the run is complete
    seeded_from: dict[str, Any] | None = None
    extra_files: dict[str, Path] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.config["tasks"])

    @property
    def general_sets(self) -> list[str]:
        return list(self.config.get("general_sets") or [])

    @property
    def method(self) -> str:
        return str(self.config.get("method") or "keeplora++")

    @property
    def complete(self) -> bool:
        return self.learned == len(self.tasks)

    @property
    def base_model_name(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path") or None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root, tuple(self.tasks))

    def checked_task(self, after_task: int | None) -> int:
        """`after_task` if it is a learned task index, the last learned task if None."""
        if after_task is None:
            return self.learned
        if isinstance(after_task, bool) or not isinstance(after_task, int) or not 1 <= after_task <= self.learned:
            raise ValueError(
                f"after_task must be a learned task index in 1..{self.learned} "
                f"({', '.join(self.tasks[: self.learned])}), got {after_task!r}"
            )
        return after_task

    def results_after(self, upto: int) -> dict[str, Any]:
        """results.json of the state after task `upto`: the runner's own when complete, else built from the rows."""
        if self.results is not None and upto == len(self.tasks):
            return self.results
        rows = [self.rows[i] if i <= upto else None for i in range(len(self.tasks) + 1)]
        results = run_results(
            self.tasks, self.method, self.general_sets, rows, config=self.config,
            seed=(self.config.get("training") or {}).get("seed"), versions=(self.results or {}).get("versions", {}),
        )
        return to_jsonable(results)


def read_run(path: str | os.PathLike, *, source: str | None = None) -> RunInfo:
    """Read and check a run directory (the runner's layout) or a downloaded repo (the pushed layout).

    Raises `ValueError` naming what is missing or inconsistent: no run.json, no learned task, a task learned but
    not evaluated, an adapter whose continual state does not match its place in the sequence, a non-KeepLoRA adapter.
    """
    root = Path(path)
    source = source or str(root)
    if not root.is_dir():
        raise ValueError(f"no run directory at {root}")
    if not (root / RUN_FILE).is_file():
        raise ValueError(
            f"{source} is not a KeepLoRA run: it has no {RUN_FILE} (ContinualRunner writes one when a run starts)"
        )
    config = read_json(root / RUN_FILE)
    tasks = config.get("tasks") if isinstance(config, dict) else None
    if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"{source}/{RUN_FILE} lists no task sequence ('tasks'); the file is not a run description")
    layout = RunLayout(root, tuple(tasks))
    slugs = [layout.slug(i) for i in range(1, len(tasks) + 1)]
    if (root / TASKS_DIR).is_dir():
        strays = sorted(p.name for p in (root / TASKS_DIR).iterdir() if p.is_dir() and p.name not in slugs)
        if strays:
            raise ValueError(
                f"{source}/{TASKS_DIR} holds {strays}, which are not part of this run's sequence {tasks}: the "
                "directory mixes runs"
            )

    adapters = _adapters(layout, source)
    for index, adapter in adapters.items():
        held = _state_task_index(adapter, str(adapter))
        if held != index:
            raise ValueError(
                f"{adapter} should hold the state after task {index} ({tasks[index - 1]}) but its continual state "
                f"holds {held} tasks: the run directory is inconsistent"
            )
    learned = max(adapters)
    rows = _rows(layout, learned, source)

    adapter_config = read_json(adapters[learned] / ADAPTER_FILES[0])
    peft_type = str(adapter_config.get("peft_type"))
    if peft_type != KEEPLORA_PEFT_TYPE:
        raise ValueError(
            f"{source} holds a {peft_type} adapter, not a {KEEPLORA_PEFT_TYPE} one: only KeepLoRA runs carry the "
            "continual state that keeplora_hf.hub shares and continues"
        )
    results = None
    if learned == len(tasks) and layout.results_file.is_file():
        saved = read_json(layout.results_file)
        if saved.get("tasks") == tasks and config.get("method", "keeplora++") in saved.get("methods", {}):
            results = saved
    seeded = read_json(layout.seed_file) if layout.seed_file.is_file() else None
    return RunInfo(root, source, config, rows, adapters, learned, adapter_config, results, seeded)


def _adapters(layout: RunLayout, source: str) -> dict[int, Path]:
    """Task index -> the adapter saved after it: under tasks/, and the pushed layout's last one at the root."""
    adapters: dict[int, Path] = {}
    for index in range(1, len(layout.task_names) + 1):
        adapter = layout.adapter_dir(index)
        if adapter.exists():
            _check_adapter_files(adapter, f"{source}/{adapter.relative_to(layout.root).as_posix()}")
            adapters[index] = adapter
    root = layout.root
    if (root / ADAPTER_FILES[0]).is_file():
        _check_adapter_files(root, source)
        index = _state_task_index(root, source)
        if not 1 <= index <= len(layout.task_names):
            raise ValueError(
                f"the adapter at the root of {source} holds {index} tasks, but the run has {len(layout.task_names)}"
            )
        adapters.setdefault(index, root)
    if not adapters:
        raise ValueError(
            f"{source} holds an incomplete run: no task has been learned yet (no {TASKS_DIR}/NNN_<name>/"
            f"{ADAPTER_DIR}). Finish at least one task (run the same command again to resume) before pushing or continuing it."
        )
    return adapters


def _rows(layout: RunLayout, learned: int, source: str) -> dict[int, dict[str, Any]]:
    """The accuracy rows 0..learned, each required, and none after the last learned task."""
    tasks = layout.task_names
    rows: dict[int, dict[str, Any]] = {}
    for index in range(0, len(tasks) + 1):
        file = layout.row_file(index)
        if index <= learned and not file.is_file():
            what = "the model before any task" if index == 0 else f"task {index} ({tasks[index - 1]})"
            raise ValueError(
                f"{source} holds an incomplete run: {what} has no accuracy row ({file.relative_to(layout.root)}); the "
                "run was interrupted during evaluation. Run the same command again to finish it."
            )
        if index > learned and file.exists():
            raise ValueError(
                f"{source}: {file.relative_to(layout.root)} exists but no adapter after task {index} or later does: "
                "the run directory is inconsistent"
            )
        if file.is_file():
            row = read_json(file)
            if not isinstance(row, dict) or len(row.get("accuracies") or []) != len(tasks):
                raise ValueError(f"{file} does not hold one accuracy per task of the sequence ({len(tasks)})")
            rows[index] = row
    return rows


def _check_adapter_files(directory: Path, where: str) -> None:
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{where} is an incomplete adapter: it lacks {', '.join(missing)}")


def _state_task_index(adapter: Path, where: str) -> int:
    """How many tasks the continual state saved in `adapter` has learned."""
    key = f"{STATE_KEY}.task_index"
    try:
        with safe_open(str(adapter / ADAPTER_FILES[1]), framework="pt") as f:
            names = [k for k in f.keys() if k == key or k.endswith("." + key)]
            if not names:
                raise ValueError(
                    f"the adapter in {where} holds no KeepLoRA continual state ({key}): it was not saved by keeplora_hf"
                )
            return int(f.get_tensor(names[0]).item())
    except (OSError, RuntimeError, SafetensorError) as error:  # how safetensors reports a truncated or corrupt file
        file = adapter / ADAPTER_FILES[1]
        raise ValueError(f"cannot read {file} ({error}): the file is incomplete or corrupt") from None
