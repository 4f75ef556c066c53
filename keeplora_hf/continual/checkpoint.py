"""Atomic writes: a reader (a resumed run) sees a file or directory whole, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout
from transformers.trainer_callback import TrainerState

STAGING_PREFIX = ".staging-"
LOCK_FILE = ".lock"
#: what the lock leaves in a run directory (the lock, and who holds it): not part of a run
LOCK_FILES = (LOCK_FILE, f"{LOCK_FILE}.holder")


class RunLock:
    """An advisory lock on a run directory's `.lock` (`filelock`: `flock` on POSIX, `msvcrt` on Windows), held while
    one runner works in it, with who holds it in `.lock.holder`.

    The operating system drops it when its process ends, even by `kill -9`, so a resumed run never finds a stale lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.run_dir / LOCK_FILE)
        holder = self.run_dir / LOCK_FILES[1]
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = holder.read_text().strip() if holder.is_file() else ""
            raise RuntimeError(
                f"{self.run_dir} is in use by another runner ({who or 'another process'}): wait for it to finish, or "
                "choose another output directory"
            ) from None
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a staging directory beside `final` and rename it into place only if the block succeeds.

    An existing `final` is replaced, but moved aside rather than deleted until the new directory is in place, so an
    interruption leaves the old directory or the new one, never neither (callers refuse to replace what they must not).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{STAGING_PREFIX}{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while writing
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}.", dir=final.parent))
    try:
        with_default_mode(staging)
        yield staging
        _fsync_tree(staging)
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}.old.", dir=final.parent))
            os.replace(final, aside / final.name)
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write beside `path` then rename, so a reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with_default_mode(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> Any:
    """The JSON in `path`; a file that does not parse is a `ValueError` naming it (a run was copied or edited badly)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON in UTF-8 ({error}): the file is incomplete or corrupt") from None


def complete_trainer_checkpoint(path: Path) -> bool:
    """A Trainer checkpoint is whole once its `trainer_state.json` (written last) parses."""
    try:
        TrainerState.load_from_json(str(path / "trainer_state.json"))
    except (OSError, ValueError):
        return False
    return True


def with_default_mode(path: Path) -> None:
    """Give a temporary file or directory the mode a plain `open()` / `mkdir()` would have (0666 / 0777 less the
    umask): `mkstemp` / `mkdtemp` create them private (0600 / 0700), so shared results would be unreadable to others."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
