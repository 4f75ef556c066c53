"""Push a continual run to the Hub in ONE commit: its final KEEPLORA adapter (with the whole continual state), its
plain-LoRA export, `results.json`, the plots, the run record and the card; optionally one revision per task."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from peft import PeftModel
from torch import nn

from ..continual.report import format_percent, write_report
from ..continual.run_dir import ADAPTER_FILES, RUN_FILE, TASKS_DIR, RunInfo, read_run
from .card import PLAIN_LORA_DIR, render_card
from .load import export_after, model_at
from .repo import HubOfflineError, check_repo_id, hub_offline, revision_name

if TYPE_CHECKING:
    from ..continual.runner import ContinualRunner

logger = logging.getLogger(__name__)

REVISION_KINDS = ("branch", "tag")


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
    revision_names = {i: revision_name(info, i) for i in range(1, info.learned + 1)} if kind else {}

    with tempfile.TemporaryDirectory(prefix="keeplora-push-") as tmp:
        staging = Path(tmp)
        live = model_at(info, model, base_model)
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


def run_and_push(runner: ContinualRunner, repo_id: str, **push_options: Any) -> dict[str, Any]:
    """`runner.run()`, then `push_run` of its output directory with the runner's live model, and its results.

    The repo id is checked before the first task, not after the whole sequence. Only the main process pushes, and
    only a KeepLoRA run (a baseline has no continual state to share). `push_options` are `push_run`'s
    (`per_task_revisions=`, `private=`, `token=`...).
    """
    check_repo_id(repo_id)
    results = runner.run()
    if runner.state.is_main_process and runner.keeplora:
        push_run(runner.output_dir, repo_id, model=runner.model, **push_options)
    runner.state.wait_for_everyone()
    return results


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
    export_after(model, index, staging / PLAIN_LORA_DIR, overwrite=False)
    for file in sorted((staging / PLAIN_LORA_DIR).iterdir()):
        files[f"{PLAIN_LORA_DIR}/{file.name}"] = file
    files[RUN_FILE] = info.root / RUN_FILE
    for row in range(0, index + 1):
        file = info.layout.row_file(row)
        files[file.relative_to(info.root).as_posix()] = file
    for written in write_report(info.results_after(index), staging / "report"):
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
    return path.startswith((f"{TASKS_DIR}/", f"{PLAIN_LORA_DIR}/")) or ("/" not in path and path.endswith(".png"))


def _commit_description(info: RunInfo) -> str:
    metrics = info.results_after(info.learned)["methods"][info.method].get("metrics") or {}
    shown = ", ".join(f"{k} {format_percent(metrics.get(k))}" for k in ("last", "avg", "bwt") if k in metrics)
    return f"Tasks: {', '.join(info.tasks)}. Metrics (%): {shown}. Pushed with keeplora_hf.hub.push_run."



def _revision_kind(value: bool | str) -> str | None:
    if value is False or value is None:
        return None
    if value is True:
        return "branch"
    if value in REVISION_KINDS:
        return str(value)
    raise ValueError(f"per_task_revisions must be False, True, 'branch' or 'tag', got {value!r}")

