"""Hub repos of runs: repo ids, offline mode, revision names, and opening a run from a directory or a pushed repo."""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..continual.run_dir import (
    ADAPTER_DIR,
    ADAPTER_FILES,
    RESULTS_FILE,
    ROW_FILE,
    ROW_ZERO,
    RUN_FILE,
    TASKS_DIR,
    RunInfo,
    read_run,
)

# what `open_run` downloads from a pushed repo: the final adapter and the run record, not the export or the plots
PULL_PATTERNS = [
    *ADAPTER_FILES, RUN_FILE, ROW_ZERO, RESULTS_FILE, f"{TASKS_DIR}/*/{ROW_FILE}", f"{TASKS_DIR}/*/{ADAPTER_DIR}/*",
]
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubOfflineError(RuntimeError):
    """The Hub cannot be reached because offline mode is on (``HF_HUB_OFFLINE=1``)."""


def open_run(
    run_or_repo: str | os.PathLike | RunInfo, *, revision: str | None = None, token: str | bool | None = None
) -> RunInfo:
    """A run from a local directory, or from a Hub repo id (downloaded with `snapshot_download`, cache-aware)."""
    if isinstance(run_or_repo, RunInfo):
        return run_or_repo
    name = str(run_or_repo)
    path = Path(name).expanduser()
    if path.exists():
        return read_run(path)
    check_local_folder(name, "run")
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


def check_local_folder(name: str, what: str) -> None:
    """Refuse `name` when it can only be a local path (not a Hub id) and no such folder exists, rather than let the
    Hub client call it a malformed repo id. A Hub id is 'name' or 'namespace/name': a name that starts with '.', '~' or
    a root, has more than one separator, or whose parent folder exists here is a path."""
    path = Path(name).expanduser()
    if path.exists():
        return
    parts = Path(name).parts
    if name.startswith((".", "~")) or os.path.isabs(name) or len(parts) > 2 or (len(parts) == 2 and path.parent.is_dir()):
        resolved = f" ({path.resolve()})" if str(path.resolve()) != name else ""
        raise ValueError(
            f"{what} folder not found: {name}{resolved}: it is neither a {what} directory nor a valid Hub repo id. Give "
            "the path of an existing folder, or a Hub id 'namespace/name'."
        )


def hub_offline() -> bool:
    """Offline mode as the environment says now (``HF_HUB_OFFLINE``), else as huggingface_hub read it at import."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None and value.strip():
        return value.strip().upper() in _TRUE
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_model_id(name: str | None) -> str | None:
    """`name` if it can be a Hub model id, None for a local path (or nothing)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def revision_name(info: RunInfo, index: int) -> str:
    """The revision holding the state after task `index`, when pushed with per-task revisions: task-NNN-<name>."""
    return f"task-{index:03d}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", info.tasks[index - 1]).strip("-.")
