"""Share continual runs on the Hugging Face Hub, and continue them from there.

- `render_card(run)`: the model card of a run (``model_cards/keeplora_adapter.md``, rendered with
  `huggingface_hub.ModelCard`): metadata for the Hub, the task sequence, the hyperparameters, the accuracy matrix and
  metrics, and how to load it.
- `push_run(run_dir, repo_id)`: the run's final KEEPLORA adapter (with the whole continual state), its plain-LoRA
  export, `results.json`, the plots, the run record and the card, in ONE commit; optionally one revision per task.
- `load_run(run_or_repo, base_model)`: base + learned tasks + subspace state, rebuilt from a run directory or a
  pushed repo, ready for the next task.
- `seed_run_dir(run_or_repo, new_output_dir, tasks=...)`: a new run directory holding a saved or pushed run, so
  `ContinualRunner` resumes from it and learns the tasks appended to the sequence.
- `export_run(run_or_repo, out, after_task=K)`: the plain LoRA of the first K tasks (rank K*r).

Layout of a pushed repo (main branch): ``adapter_config.json`` + ``adapter_model.safetensors`` (the KEEPLORA
adapter after the last learned task; its safetensors hold the continual state), ``plain_lora/`` (the same change as
a plain LoRA), ``README.md`` (the card), ``results.json``, ``report.md``, the PNG plots, and the run record that
`seed_run_dir` needs: ``run.json``, ``row_000.json``, ``tasks/NNN_<name>/row.json``. A per-task revision holds the
same files for the state after that task. Only the final adapter is pushed (each adapter carries every task's
update, plus subspace bases that may weigh gigabytes on a 7B model), so a repo rebuilds the state after its last
task, and every earlier task's plain LoRA, but the continual state after an earlier task only from that task's
revision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from torch import nn

from .continual.checkpoint import with_default_mode
from .continual.metrics import METRIC_NAMES, compute_all
from .continual.report import (
    MISSING,
    METRIC_HELP,
    format_percent,
    markdown_table,
    matrix_rows,
    plot_names,
    to_jsonable,
    write_report,
)
from .continual.runner import data_fingerprint
from .export import check_export_target, export_lora
from .subspace import squared_singular_values
from .tuner.layer import base_weight, layer_state
from .tuner.model import STATE_KEY, keeplora_layers, tuner_of
from .tuner.registration import KEEPLORA_PEFT_TYPE

logger = logging.getLogger(__name__)

__all__ = [
    "HubOfflineError",
    "PushResult",
    "RunInfo",
    "check_repo_id",
    "export_run",
    "hub_offline",
    "load_run",
    "open_run",
    "push_run",
    "read_run",
    "render_card",
    "seed_run_dir",
]

# the card templates: model_cards/ at the repository root, reached through the package link keeplora_hf/model_cards
# (setuptools copies the linked files into wheels)
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "keeplora_adapter.md"
CARD_TAGS = ("keeplora", "lora", "continual-learning")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PLAIN_LORA_DIR = "plain_lora"
SEED_FILE = "seeded_from.json"
RUN_FILE = "run.json"
ROW_ZERO = "row_000.json"
# what `open_run` downloads from a pushed repo: the final adapter and the run record, not the export or the plots
PULL_PATTERNS = [*ADAPTER_FILES, RUN_FILE, ROW_ZERO, "results.json", "tasks/*/row.json", "tasks/*/adapter/*"]
ADAPTER_HYPERPARAMETERS = (
    "r", "lora_alpha", "target_modules", "principal_energy", "feature_energy", "layer_scale_gamma",
    "gradient_data_ratio", "train_lora_A", "lora_A_init", "feature_source", "lora_dropout", "rank_pattern",
    "alpha_pattern", "modules_to_save",
)
REVISION_KINDS = ("branch", "tag")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubOfflineError(RuntimeError):
    """The Hub cannot be reached because offline mode is on (``HF_HUB_OFFLINE=1``)."""


# -- run directories and pushed repos ----------------------------------------------------------------------------


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

    def slug(self, index: int) -> str:
        return f"{index:03d}_{self.tasks[index - 1]}"

    def task_dir(self, index: int) -> Path:
        return self.root / "tasks" / self.slug(index)

    def row_file(self, index: int) -> Path:
        return self.root / ROW_ZERO if index == 0 else self.task_dir(index) / "row.json"


def read_run(path: str | os.PathLike, *, source: str | None = None) -> RunInfo:
    """Read and check a run directory (the runner's layout) or a downloaded repo (the pushed layout).

    Raises `ValueError` naming what is missing or inconsistent: no run.json, no learned task, a task learned but
    not evaluated, an adapter whose continual state does not match its place in the sequence, a non-KEEPLORA adapter.
    """
    root = Path(path)
    source = source or str(root)
    if not root.is_dir():
        raise ValueError(f"no run directory at {root}")
    if not (root / RUN_FILE).is_file():
        raise ValueError(
            f"{source} is not a KeepLoRA run: it has no {RUN_FILE} (ContinualRunner writes one when a run starts)"
        )
    config = _read_json(root / RUN_FILE)
    tasks = config.get("tasks") if isinstance(config, dict) else None
    if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"{source}/{RUN_FILE} lists no task sequence ('tasks'); the file is not a run description")
    slugs = [f"{i:03d}_{name}" for i, name in enumerate(tasks, start=1)]
    if (root / "tasks").is_dir():
        strays = sorted(p.name for p in (root / "tasks").iterdir() if p.is_dir() and p.name not in slugs)
        if strays:
            raise ValueError(
                f"{source}/tasks holds {strays}, which are not part of this run's sequence {tasks}: the directory "
                "mixes runs"
            )

    adapters: dict[int, Path] = {}
    for index, slug in enumerate(slugs, start=1):
        adapter = root / "tasks" / slug / "adapter"
        if adapter.exists():
            _check_adapter_files(adapter, f"{source}/tasks/{slug}/adapter")
            adapters[index] = adapter
    if (root / ADAPTER_FILES[0]).is_file():  # the pushed layout: the last task's adapter at the root
        _check_adapter_files(root, source)
        index = _state_task_index(root, source)
        if not 1 <= index <= len(tasks):
            raise ValueError(f"the adapter at the root of {source} holds {index} tasks, but the run has {len(tasks)}")
        adapters.setdefault(index, root)
    if not adapters:
        raise ValueError(
            f"{source} holds an incomplete run: no task has been learned yet (no tasks/NNN_<name>/adapter). "
            "Finish at least one task (run the same command again to resume) before pushing or continuing it."
        )
    for index, adapter in adapters.items():
        held = _state_task_index(adapter, str(adapter))
        if held != index:
            raise ValueError(
                f"{adapter} should hold the state after task {index} ({tasks[index - 1]}) but its continual state "
                f"holds {held} tasks: the run directory is inconsistent"
            )
    learned = max(adapters)

    rows: dict[int, dict[str, Any]] = {}
    for index in range(0, len(tasks) + 1):
        file = root / ROW_ZERO if index == 0 else root / "tasks" / slugs[index - 1] / "row.json"
        if index <= learned and not file.is_file():
            what = "the model before any task" if index == 0 else f"task {index} ({tasks[index - 1]})"
            raise ValueError(
                f"{source} holds an incomplete run: {what} has no accuracy row ({file.relative_to(root)}); the run "
                "was interrupted during evaluation. Run the same command again to finish it."
            )
        if index > learned and file.exists():
            raise ValueError(
                f"{source}: {file.relative_to(root)} exists but no adapter after task {index} or later does: the run "
                "directory is inconsistent"
            )
        if file.is_file():
            row = _read_json(file)
            if not isinstance(row, dict) or len(row.get("accuracies") or []) != len(tasks):
                raise ValueError(f"{file} does not hold one accuracy per task of the sequence ({len(tasks)})")
            rows[index] = row

    adapter_config = _read_json(adapters[learned] / ADAPTER_FILES[0])
    peft_type = str(adapter_config.get("peft_type"))
    if peft_type != KEEPLORA_PEFT_TYPE:
        raise ValueError(
            f"{source} holds a {peft_type} adapter, not a {KEEPLORA_PEFT_TYPE} one: only KeepLoRA runs carry the "
            "continual state that keeplora_hf.hub shares and continues"
        )
    results = None
    if learned == len(tasks) and (root / "results.json").is_file():
        saved = _read_json(root / "results.json")
        if saved.get("tasks") == tasks and config.get("method", "keeplora++") in saved.get("methods", {}):
            results = saved
    seeded = _read_json(root / SEED_FILE) if (root / SEED_FILE).is_file() else None
    return RunInfo(root, source, config, rows, adapters, learned, adapter_config, results, seeded)


def open_run(
    run_or_repo: str | os.PathLike | RunInfo, *, revision: str | None = None, token: str | bool | None = None
) -> RunInfo:
    """A run from a local directory, or from a Hub repo id (downloaded with `snapshot_download`, cache-aware)."""
    if isinstance(run_or_repo, RunInfo):
        return run_or_repo
    path = Path(run_or_repo)
    if path.exists():
        return read_run(path)
    name = str(run_or_repo)
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ValueError(f"{name!r} is neither a run directory nor a valid Hub repo id: {error}") from None
    offline = hub_offline()
    try:
        local = huggingface_hub.snapshot_download(
            name, revision=revision, token=token, allow_patterns=PULL_PATTERNS, local_files_only=offline
        )
    except RepositoryNotFoundError:
        raise ValueError(
            f"{name!r} is not a local run directory, and the Hub has no repo {name!r} that you can read (a private "
            "repo needs token= or `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"the Hub repo {name!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise HubOfflineError(
                f"{name!r} is not a local run directory, and it cannot be downloaded from the Hub: the Hub is offline "
                "(HF_HUB_OFFLINE=1) and the repo is not in the local cache"
            ) from None
        raise
    return read_run(Path(local), source=name + (f"@{revision}" if revision else ""))


# -- the model card ----------------------------------------------------------------------------------------------


def render_card(
    run: str | os.PathLike | RunInfo,
    *,
    repo_id: str | None = None,
    after_task: int | None = None,
    revision: str | None = None,
    revisions: dict[int, str] | None = None,
    base_model_id: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card of a run (of its state after `after_task`, default the last learned task).

    `base_model_id` names the base model on the Hub when the adapter records a local path or nothing; `revision` is
    the revision the card is uploaded to (its snippets load it), `revisions` the per-task revisions to list.
    """
    info = open_run(run)
    upto = _checked_task(info, after_task)
    results = _results(info, upto)
    entry = results["methods"][info.method]
    recorded = info.base_model_name
    base_id = _hub_model_id(base_model_id) or _hub_model_id(recorded)
    if base_model_id and not _hub_model_id(base_model_id):
        raise ValueError(f"base_model_id {base_model_id!r} is not a Hub model id ('namespace/name')")
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_id,
        tags=[*CARD_TAGS, *([f"base_model:adapter:{base_id}"] if base_id else [])],
        pipeline_tag=pipeline_tag or _pipeline_tag(info.adapter_config),
        datasets=list(datasets) if datasets else _strings(info.config.get("datasets")),
        license=license or (info.config.get("license") if isinstance(info.config.get("license"), str) else None),
    )
    R = np.array(entry["accuracy_matrix"], dtype=float)
    header, rows = matrix_rows(R, info.tasks, entry.get("general") or {}, MISSING)
    metrics = entry.get("metrics") or compute_all(R, entry.get("general") or None)
    metric_rows = [[name, format_percent(metrics.get(name)), METRIC_HELP[name]] for name in METRIC_NAMES]
    heatmap, curve = plot_names(info.method)
    peft_config = {**(info.config.get("peft_config") or {}), **info.adapter_config}
    revisions = revisions or {}
    title = repo_id.split("/")[-1] if repo_id else f"KeepLoRA++ run: {', '.join(info.tasks[:upto])}"
    kwargs = dict(
        title=title,
        repo_id=repo_id or "<repo_id>",
        revision=revision,
        revision_note=(
            f"the state after task {upto} of {len(info.tasks)} ({info.tasks[upto - 1]}); the main branch holds the "
            "latest state" if revision else None
        ),
        learned=upto,
        total=len(info.tasks),
        base_model=base_id,
        base_model_note=_base_model_note(recorded),
        method=info.method,
        base_class=(info.adapter_config.get("auto_mapping") or {}).get("base_model_class"),
        peft_type=info.adapter_config.get("peft_type", KEEPLORA_PEFT_TYPE),
        rank=info.adapter_config.get("r"),
        continued_from=_public_source((info.seeded_from or {}).get("source")),
        tasks=[
            {
                "index": i,
                "name": _cell(name),
                "learned": i <= upto,
                "revision": revisions.get(i),
                "data": (info.config.get("data") or {}).get(name, "?"),
            }
            for i, name in enumerate(info.tasks, start=1)
        ],
        general_sets=info.general_sets,
        missing=MISSING,
        matrix_table="\n".join(markdown_table(header, rows)),
        metrics_table="\n".join(markdown_table(["metric", "value (%)", "meaning"], metric_rows, text_columns=(0, 2))),
        plots=[
            {"alt": f"{info.method}: accuracy matrix", "file": heatmap},
            {"alt": f"{info.method}: accuracy over the sequence", "file": curve},
        ],
        adapter_hyperparameters=[
            (name, _cell(_plain(peft_config[name])))
            for name in ADAPTER_HYPERPARAMETERS
            if peft_config.get(name) not in (None, {}, [])
        ],
        training_hyperparameters=[
            (name, _cell(_plain(value)))
            for name, value in (info.config.get("training") or {}).items()
            if value is not None
        ],
        files=_card_files(info, heatmap, curve),
        versions=", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items()) or "versions not recorded",
        seed=results.get("seed", "?"),
    )
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found")
    return ModelCard.from_template(card_data, template_path=str(template), **kwargs)


# -- push --------------------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    """What `push_run` committed: the main commit, one commit per task revision, and every file of the main commit."""

    repo_id: str
    commit: str
    commit_url: str
    files: list[str]
    revisions: dict[str, str] = field(default_factory=dict)  # revision name -> commit id


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: nn.Module | str | os.PathLike | None = None,
    model: PeftModel | None = None,
    per_task_revisions: bool | str = False,
    private: bool = False,
    api: HfApi | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    base_model_id: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
) -> PushResult:
    """Push a run to `repo_id` in ONE commit: adapter + continual state, plain-LoRA export, results, plots, card.

    The plain-LoRA export needs the model at the run's last learned task: pass `model` (the live `PeftModel`, e.g.
    the runner's at the end of a run) or `base_model` (a fresh pre-trained base module, or its Hub id / local path;
    default: the adapter's `base_model_name_or_path`), from which the run is rebuilt. `per_task_revisions` (`True` or
    `"branch"`, or `"tag"`) also gives every learned task a revision named `task-NNN-<name>` holding the state after
    it (one commit each). `private=True` creates the repo private; an existing repo keeps its visibility.
    Everything is checked and rendered into a temporary directory before the Hub is contacted, and nothing in
    `run_dir` is ever written; with `HF_HUB_OFFLINE=1` this fails before doing anything.
    """
    repo_id = check_repo_id(repo_id)
    info = read_run(run_dir)
    kind = _revision_kind(per_task_revisions)
    if kind:
        missing = [i for i in range(1, info.learned + 1) if i not in info.adapters]
        if missing:
            raise ValueError(
                f"per-task revisions need the adapter after every task, but {info.source} has none after task(s) "
                f"{missing} (a run seeded from a pushed repo keeps only its last state); push without per-task "
                "revisions"
            )
    if hub_offline():
        raise HubOfflineError(
            f"cannot push {info.source} to {repo_id}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1). Nothing was "
            f"pushed and the run directory is unchanged. Push it later, once online, with:\n"
            f"    HF_HUB_OFFLINE=0 keeplora-hf push {info.source} {repo_id}"
            + (f" --per-task-revisions {kind}" if kind else "")
        )
    card_options = dict(base_model_id=base_model_id, license=license, datasets=datasets, pipeline_tag=pipeline_tag)
    revision_names = {i: _revision_name(info, i) for i in range(1, info.learned + 1)} if kind else {}

    with tempfile.TemporaryDirectory(prefix="keeplora-push-") as tmp:
        staging = Path(tmp)
        live = _model_at(info, model, base_model)
        main_files = _stage(info, info.learned, live, staging / "main", repo_id, None, revision_names, card_options)
        task_files = {
            index: _stage(info, index, live, staging / name, repo_id, name, revision_names, card_options)
            for index, name in revision_names.items()
        }
        del live

        api = api or HfApi(token=token)
        # private=None: a new repo gets the namespace's default visibility (an organisation may default to private)
        api.create_repo(repo_id, private=private or None, exist_ok=True, token=token, repo_type="model")
        existing = api.list_repo_files(repo_id, token=token, repo_type="model")
        operations = _operations(main_files, existing, _pushed_by_us)
        learned = ", ".join(info.tasks[: info.learned])
        message = commit_message or f"KeepLoRA++ run: {info.learned} of {len(info.tasks)} tasks ({learned})"
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            commit_description=_commit_description(info),
            token=token,
            repo_type="model",
        )
        result = PushResult(repo_id, commit.oid, commit.commit_url, sorted(main_files))
        for index, name in revision_names.items():
            result.revisions[name] = _push_revision(
                api, repo_id, kind, name, task_files[index], commit.oid, token, info, index
            )
    logger.info("pushed %s to %s (%s)", info.source, repo_id, result.commit_url)
    return result


def _push_revision(api, repo_id, kind, name, files, parent, token, info, index) -> str:
    """One commit holding the state after task `index`, on branch `name`, or tagged `name` (via a scratch branch)."""
    branch = name if kind == "branch" else f"keeplora-staging-{name}"
    api.create_branch(repo_id, branch=branch, revision=parent, exist_ok=True, token=token, repo_type="model")
    existing = api.list_repo_files(repo_id, revision=branch, token=token, repo_type="model")
    commit = api.create_commit(
        repo_id,
        operations=_operations(files, existing, lambda path: path != ".gitattributes"),
        commit_message=f"KeepLoRA++ run: state after task {index} of {len(info.tasks)} ({info.tasks[index - 1]})",
        revision=branch,
        token=token,
        repo_type="model",
    )
    if kind == "tag":
        tags = {ref.name for ref in api.list_repo_refs(repo_id, token=token, repo_type="model").tags}
        if name in tags:  # a tag does not move: replace the one of an earlier push
            api.delete_tag(repo_id, tag=name, token=token, repo_type="model")
        api.create_tag(repo_id, tag=name, revision=commit.oid, token=token, repo_type="model")
        api.delete_branch(repo_id, branch=branch, token=token, repo_type="model")
    return commit.oid


def _stage(
    info: RunInfo,
    index: int,
    model: PeftModel,
    staging: Path,
    repo_id: str,
    revision: str | None,
    revisions: dict[int, str],
    card_options: dict[str, Any],
) -> dict[str, Path]:
    """Every file of the state after task `index`, as path in the repo -> local file (run files are only read)."""
    staging.mkdir(parents=True)
    files: dict[str, Path] = {name: info.adapters[index] / name for name in ADAPTER_FILES}
    _export_after(model, index, staging / PLAIN_LORA_DIR, overwrite=False)
    for file in sorted((staging / PLAIN_LORA_DIR).iterdir()):
        files[f"{PLAIN_LORA_DIR}/{file.name}"] = file
    files[RUN_FILE] = info.root / RUN_FILE
    for row in range(0, index + 1):
        files[str(info.row_file(row).relative_to(info.root).as_posix())] = info.row_file(row)
    for written in write_report(_results(info, index), staging / "report"):
        files[written.name] = written
    card = render_card(info, repo_id=repo_id, after_task=index, revision=revision, revisions=revisions, **card_options)
    (staging / "README.md").write_text(str(card), encoding="utf-8")
    files["README.md"] = staging / "README.md"
    return files


def _operations(files: dict[str, Path], existing: Sequence[str], stale) -> list:
    adds = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in sorted(files.items())]
    gone = [path for path in sorted(existing) if path not in files and stale(path)]
    deletes = [CommitOperationDelete(path_in_repo=path) for path in gone]
    return adds + deletes


def _pushed_by_us(path: str) -> bool:
    """Files of an earlier push that this one replaces; a repo's other files are left alone."""
    return path.startswith(("tasks/", f"{PLAIN_LORA_DIR}/")) or ("/" not in path and path.endswith(".png"))


def _commit_description(info: RunInfo) -> str:
    metrics = _results(info, info.learned)["methods"][info.method].get("metrics") or {}
    shown = ", ".join(f"{k} {format_percent(metrics.get(k))}" for k in ("last", "avg", "bwt") if k in metrics)
    return f"Tasks: {', '.join(info.tasks)}. Metrics (%): {shown}. Pushed with keeplora_hf.hub.push_run."


# -- rebuild and continue ----------------------------------------------------------------------------------------


def load_run(
    run_or_repo: str | os.PathLike | RunInfo,
    base_model: nn.Module | str | os.PathLike | None = None,
    *,
    after_task: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = True,
) -> PeftModel:
    """Base + learned tasks + subspace state, from a run directory or a repo id, ready to learn the next task.

    `base_model` is the fresh pre-trained model the run started from (it is changed in place: the learned tasks
    are merged into its weights), or its Hub id / local path, or None for the adapter's `base_model_name_or_path`.
    Refuses a base model of another name (both Hub ids) or class than the one the adapter records, one whose weights
    the saved principal subspaces do not fit (another model of the same shapes), and one whose shapes do not fit.
    """
    info = open_run(run_or_repo, revision=revision, token=token)
    index = _checked_task(info, after_task)
    if index not in info.adapters:
        raise ValueError(
            f"{info.source} keeps no adapter after task {index} ({info.tasks[index - 1]}), only after task(s) "
            f"{sorted(info.adapters)}: a pushed repo holds its last state, and earlier ones in its per-task revisions "
            f"(revision='{_revision_name(info, index)}') when pushed with them"
        )
    base = _base_module(base_model, info)
    _check_base_fits(info, info.adapters[index], base)
    try:
        return PeftModel.from_pretrained(base, str(info.adapters[index]), is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ValueError(
            f"the KeepLoRA adapter after task {index} of {info.source} does not fit the given base model: {error}"
        ) from error


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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".seed-{out.name}.", dir=out.parent))
    try:
        with_default_mode(staging)
        _write_json(staging / RUN_FILE, config)
        for index in range(0, info.learned + 1):
            row = copy.deepcopy(info.rows[index])
            row["accuracies"] = list(row["accuracies"]) + [None] * appended
            target = staging / info.row_file(index).relative_to(info.root)
            _write_json(target, row)
        for index, adapter in info.adapters.items():
            target = staging / "tasks" / info.slug(index) / "adapter"
            target.mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, target / name)
        _write_json(staging / SEED_FILE, {"source": info.source, "learned": info.learned, "tasks": info.tasks})
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("seeded %s from %s (%d tasks learned, %d appended)", out, info.source, info.learned, appended)
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
) -> Path:
    """Write the plain LoRA of the first `after_task` tasks (default: all learned), rank `after_task * r`.

    Rebuilt from the adapter after that task when the run keeps it; otherwise from the last adapter, whose state
    holds every finished task's update exactly, keeping only the first `after_task` of them. `out` must not be the
    run, inside it or hold it; an `out` that is not empty is refused unless `overwrite`.
    """
    info = open_run(run_or_repo, revision=revision, token=token)
    target, run = Path(out).resolve(), info.root.resolve()
    if target == run or run in target.parents or target in run.parents:
        raise ValueError(f"export target {out} is the run {info.source}, inside it or around it; choose another directory")
    check_export_target(target, overwrite)  # before the model is rebuilt, which may take minutes
    index = _checked_task(info, after_task)
    source = index if index in info.adapters else info.learned
    model = load_run(info, base_model, after_task=source, is_trainable=False)
    return _export_after(model, index, Path(out), overwrite)


# -- validation helpers ------------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a well-formed Hub repo id, else a `ValueError` that says what a repo id looks like."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"malformed Hub repo id {repo_id!r}: {error} Use 'namespace/name' (letters, digits, '-', '_', '.'), e.g. "
            "'my-user/keeplora-llava-ucit'."
        ) from None
    if not repo_id:
        raise ValueError("the Hub repo id is empty; use 'namespace/name'")
    return repo_id


def hub_offline() -> bool:
    """Offline mode as the environment says now (``HF_HUB_OFFLINE``), else as huggingface_hub read it at import."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None and value.strip():
        return value.strip().upper() in _TRUE
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _checked_task(info: RunInfo, after_task: int | None) -> int:
    if after_task is None:
        return info.learned
    if isinstance(after_task, bool) or not isinstance(after_task, int) or not 1 <= after_task <= info.learned:
        raise ValueError(
            f"after_task must be a learned task index in 1..{info.learned} ({', '.join(info.tasks[: info.learned])}), "
            f"got {after_task!r}"
        )
    return after_task


def _revision_kind(value: bool | str) -> str | None:
    if value is False or value is None:
        return None
    if value is True:
        return "branch"
    if value in REVISION_KINDS:
        return str(value)
    raise ValueError(f"per_task_revisions must be False, True, 'branch' or 'tag', got {value!r}")


def _revision_name(info: RunInfo, index: int) -> str:
    return f"task-{index:03d}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", info.tasks[index - 1]).strip("-.")


def _check_adapter_files(directory: Path, where: str) -> None:
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{where} is an incomplete adapter: it lacks {', '.join(missing)}")


def _state_task_index(adapter: Path, where: str) -> int:
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


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON in UTF-8 ({error}): the file is incomplete or corrupt") from None


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")


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


# -- models ------------------------------------------------------------------------------------------------------


def _model_at(info: RunInfo, model: PeftModel | None, base_model: Any) -> PeftModel:
    """The model at the run's last learned task: the one given, checked, or rebuilt from the base model."""
    if model is None:
        return load_run(info, base_model, is_trainable=False)
    tuner = tuner_of(model)
    progress = tuner.progress(tuner.keeplora_adapter())
    if progress.task_index != info.learned or progress.in_task:
        raise ValueError(
            f"the model given has learned {progress.task_index} task(s)"
            f"{' and is inside another' if progress.in_task else ''}, but {info.source} has learned {info.learned}: "
            "pass the model at the end of the run, or base_model="
        )
    return model


def _base_module(base_model: Any, info: RunInfo) -> nn.Module:
    recorded = info.base_model_name
    if base_model is None:
        if not recorded:
            raise ValueError(
                f"the adapter of {info.source} records no base model (it was built from a config): pass base_model=, "
                "the pre-trained model the run started from (--base-model on the command line)"
            )
        base_model = recorded
    if isinstance(base_model, (str, os.PathLike)):
        _check_base_name(recorded, str(base_model), info.source)
        return _load_base(str(base_model))
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be an nn.Module, a Hub id or a local path, got {type(base_model).__name__}")
    if isinstance(base_model, PeftModel) or any(hasattr(m, "lora_A") for m in base_model.modules()):
        raise ValueError(
            "base_model already carries adapters: pass the fresh pre-trained model (the learned tasks are merged "
            "into its weights as the run is rebuilt)"
        )
    config = getattr(base_model, "config", None)
    given = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    _check_base_name(recorded, given, info.source)
    return base_model


def _check_base_name(recorded: str | None, given: str | None, source: str) -> None:
    """Refuse a base of another name when both names are Hub ids; local paths differ across machines, so only warn."""
    if not recorded or not given or recorded == given:
        return
    if _hub_model_id(recorded) and _hub_model_id(given):
        raise ValueError(
            f"{source} was learned on the base model {recorded!r}, but the base model given is {given!r}: a KeepLoRA "
            "state only fits the model it was computed on"
        )
    logger.warning("%s records the base model %r; rebuilding it on %r", source, recorded, given)


def _check_base_fits(info: RunInfo, adapter: Path, base: nn.Module) -> None:
    """Refuse a base model of another class, or whose weights the saved principal subspaces do not come from.

    Shapes alone miss a different model of the same architecture and size. `base` is the pre-trained model, before
    the adapter merges its tasks: the weight `W` the principal subspaces were computed from. A layer saves either
    its principal basis `P` (`d_in x p`), right singular vectors of `W`, so `(W P)^T (W P)` is diagonal for that
    weight and not for another one (two products); or, when it keeps only the complement of its protected subspace
    (`keep_principal_basis=False`, the default), the energies of those directions, `W`'s top `p` squared singular
    values, compared with the given weight's (one float64 Gram eigendecomposition). Two layers are checked; this
    holds whatever epsilon_w each layer was given (recipes may give some layers their own).
    """
    recorded = (info.adapter_config.get("auto_mapping") or {}).get("base_model_class")
    if recorded and recorded != type(base).__name__:
        raise ValueError(
            f"{info.source} was learned on a {recorded}, but the base model given is a {type(base).__name__}: a "
            "KeepLoRA state only fits the model it was computed on"
        )
    suffix = f".{STATE_KEY}.principal"
    with safe_open(str(adapter / ADAPTER_FILES[1]), framework="pt") as f:
        keys = sorted(k for k in f.keys() if k.endswith(suffix))
        for key in dict.fromkeys(keys[:1] + keys[-1:]):
            name = key[: -len(suffix)].removeprefix("base_model.model.")
            try:
                weight = base_weight(base.get_submodule(name))  # dequantized through the layer when quantized
            except AttributeError:
                continue  # PEFT reports layers the base lacks
            saved = f.get_tensor(key)
            misfit = (_energies_misfit if saved.ndim == 1 else _basis_misfit)(name, saved, weight)
            if misfit:
                raise ValueError(f"the base model given is not the one {info.source} was learned on: {misfit}")


#: largest gap between saved principal energies and the given weight's squared singular values, as a share of the
#: largest: the original gives ~1e-6 (the float32 Gram solver) to ~1e-5 (a float32 weight rounded to bfloat16);
#: two random 4096 x 4096 weights differ by ~6e-3 (what concentrates most), pre-trained models far more
_ENERGY_TOLERANCE = 1e-3


def _energies_misfit(name: str, energies: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why saved principal energies are not the top squared singular values of `weight`, or None if they are."""
    p = energies.numel()
    if p == 0:
        return None
    device = weight.device if weight.device.type == "cuda" else "cpu"  # float64 everywhere else too
    values = squared_singular_values(weight.to(device)).cpu()
    if p > values.numel():
        return f"{name} saves {p} principal energies, but that layer's weight has {values.numel()} singular values"
    expected = values[:p]
    scale = torch.maximum(expected[0], energies.max().to(expected)).clamp_min(1e-300)
    gap = float((energies.to(expected) - expected).abs().max() / scale)
    if gap > _ENERGY_TOLERANCE:
        return (
            f"the principal energies saved for {name} are not that layer's top {p} squared singular values (they "
            f"differ by {gap:.2g} of the largest; at most {_ENERGY_TOLERANCE:g} for the original model, with rounding)"
        )
    return None


def _basis_misfit(name: str, basis: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why a saved principal basis is not made of right singular vectors of `weight`, or None if it is."""
    if basis.ndim != 2 or basis.shape[1] < 2 or basis.shape[0] != weight.shape[1]:
        return None  # one direction is always "diagonal"; shapes are checked when the state is loaded
    projected = weight.float() @ basis.to(weight.device, torch.float32)
    gram = projected.T @ projected
    off_diagonal = float((gram - torch.diag(torch.diag(gram))).norm() / gram.norm().clamp_min(1e-30))
    if off_diagonal > 0.02:
        return (
            f"the principal basis saved for {name} is not made of singular vectors of that layer's weight (off-diagonal "
            f"part {off_diagonal:.2g} of (W P)^T W P, about 1e-7 for the original model)"
        )
    return None


def _load_base(name_or_path: str) -> nn.Module:
    """A pre-trained model by Hub id or local path, of the class its config names (LlavaForConditionalGeneration...)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            raise ValueError(f"its config names no transformers model class (architectures={architecture!r})")
        return model_class.from_pretrained(name_or_path, dtype="auto")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the base model {name_or_path!r}: {error}") from error


@contextlib.contextmanager
def _first_tasks(model: nn.Module, count: int) -> Iterator[None]:
    """Every layer's task history cut to its first `count` tasks for the duration (the weights are left as they are)."""
    tuner = tuner_of(model)
    adapter = tuner.keeplora_adapter()
    states = [layer_state(m, adapter) for m in keeplora_layers(tuner.model, adapter).values()]
    saved = [(state.tasks, state.merged_tasks) for state in states]
    try:
        for state in states:
            state.tasks = state.tasks[:count]
        yield
    finally:
        for state, (tasks, merged) in zip(states, saved):
            state.tasks = tasks
            state.merged_tasks = merged


def _export_after(model: PeftModel, index: int, out: Path, overwrite: bool) -> Path:
    """`export_lora` of the first `index` finished tasks: exact, since each task's update is stored on its own."""
    tuner = tuner_of(model)
    progress = tuner.progress(tuner.keeplora_adapter())
    if index == progress.task_index:
        return export_lora(model, out, overwrite=overwrite)
    if index > progress.task_index or progress.in_task:
        raise ValueError(f"cannot export the first {index} tasks of a model that has learned {progress.task_index}")
    with _first_tasks(model, index):
        return export_lora(model, out, overwrite=overwrite)


# -- card and results helpers ------------------------------------------------------------------------------------


def _results(info: RunInfo, upto: int) -> dict[str, Any]:
    """results.json of the state after task `upto`: the runner's own when complete, else built from the rows."""
    if info.results is not None and upto == len(info.tasks):
        return info.results
    T = len(info.tasks)
    rows = [info.rows[i] if i <= upto else None for i in range(T + 1)]
    matrix = [row["accuracies"] if row else [None] * T for row in rows]
    general = {g: [(row.get("general") or {}).get(g) if row else None for row in rows] for g in info.general_sets}
    timings: dict[str, float] = {}
    for row in rows:
        for key, value in ((row or {}).get("timings_s") or {}).items():
            timings[key] = timings.get(key, 0.0) + float(value)
    metrics = compute_all(np.array(matrix, dtype=float), general or None)
    return to_jsonable(
        {
            "tasks": info.tasks,
            "methods": {
                info.method: {"accuracy_matrix": matrix, "general": general, "metrics": metrics, "timings_s": timings}
            },
            "config": info.config,
            "seed": (info.config.get("training") or {}).get("seed"),
            "versions": (info.results or {}).get("versions", {}),
        }
    )


def _card_files(info: RunInfo, heatmap: str, curve: str) -> list[dict[str, str]]:
    return [
        {
            "path": "adapter_config.json, adapter_model.safetensors",
            "what": "the KEEPLORA adapter with the whole continual state (load after `import keeplora_hf`)",
        },
        {"path": f"{PLAIN_LORA_DIR}/", "what": "the same change as one plain LoRA, for PEFT alone"},
        {"path": "results.json", "what": "accuracy matrix, general sets, metrics, timings, configuration"},
        {"path": "report.md", "what": "the run's report"},
        {"path": f"{heatmap}, {curve}", "what": "accuracy heatmap and accuracy over the sequence"},
        {
            "path": f"{RUN_FILE}, {ROW_ZERO}, tasks/NNN_<name>/row.json",
            "what": "the run record, to continue the sequence (`seed_run_dir`)",
        },
    ]


def _hub_model_id(name: str | None) -> str | None:
    """`name` if it can be a Hub model id, None for a local path (or nothing)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _public_source(source: str | None) -> str | None:
    """A seeded run's source as the card may show it: a repo id as it is, a local path by its last name only."""
    if not source:
        return None
    if _hub_model_id(source.split("@", 1)[0]):
        return f"`{source}`"
    return f"a local run (`{Path(source).name}`)"


def _base_model_note(recorded: str | None) -> str:
    if not recorded:
        return "a model built from a config (the adapter records no base model id)"
    if not _hub_model_id(recorded):
        return f"a local checkpoint (`{Path(recorded).name}`), not on the Hub"
    return f"`{recorded}`"


def _pipeline_tag(adapter_config: dict[str, Any]) -> str | None:
    name = ((adapter_config.get("auto_mapping") or {}).get("base_model_class")) or ""
    if not name:
        return None
    from transformers.models.auto import modeling_auto as auto

    if "Video" in name:
        return "video-text-to-text"
    for mapping, tag in (
        ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
        ("MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", "zero-shot-image-classification"),
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ):
        if name in getattr(auto, mapping, {}).values():
            return tag
    return None


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value) or None
    return None


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _cell(text: str) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")
