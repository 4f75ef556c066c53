"""What every task-data loader shares: reading a file's rows, checking each one (media paths included), and
reporting every bad row at once.

A continual run trains task after task for hours; a malformed row found in task 5 wastes tasks 1-4. So the
loaders validate the whole file up front and report every bad row at once, each error naming the file, the
row (0-based index, and its "id" when it has one) and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataFormatError",
    "RowChecker",
    "checked_dataset",
    "image_problem",
    "outside_folder",
    "read_rows",
    "row_name",
    "source_of",
    "too_many_pixels",
]

_MAX_LISTED_ERRORS = 20


class DataFormatError(ValueError):
    """One or more invalid rows; `errors` lists every message, `str()` shows the first ones."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        shown = "\n  ".join(self.errors[:_MAX_LISTED_ERRORS])
        more = len(self.errors) - _MAX_LISTED_ERRORS
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.errors)} invalid row(s):\n  {shown}{suffix}")


def row_name(source: str, index: int, row: Any) -> str:
    """`file: row 3 (id 'abc')`: the prefix of every per-row error."""
    row_id = row.get("id") if isinstance(row, dict) else None
    return f"{source}: row {index}" + (f" (id {row_id!r})" if row_id is not None else "")


def source_of(dataset: datasets.Dataset) -> str:
    """The file a loader read `dataset` from, or a placeholder for datasets built some other way."""
    return dataset.info.description or "<dataset>"


@dataclass
class RowChecker:
    """Collects a file's errors so they can all be reported together."""

    source: str
    errors: list[str] = field(default_factory=list)

    def add(self, index: int, row: Any, problem: str) -> None:
        self.errors.append(f"{row_name(self.source, index, row)}: {problem}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise DataFormatError(self.errors)


def read_rows(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (`.jsonl`, or any file whose content is one object per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is accepted
    except UnicodeDecodeError as error:
        raise DataFormatError([f"{path}: not UTF-8 text ({error}); save the file as UTF-8"]) from None
    if path.suffix != ".jsonl":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            if not text.lstrip().startswith("{"):
                raise DataFormatError([f"{path}: not valid JSON ({error})"]) from error
        else:
            if not isinstance(rows, list):
                raise DataFormatError([f"{path}: expected a JSON list of rows, got {type(rows).__name__}"])
            return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFormatError([f"{path}: line {number} is not valid JSON ({error})"]) from error
    return rows


def outside_folder(folder: Path, relative: str) -> str | None:
    """Why a media path would leave its data folder (`..`, an absolute path, a link out), or None."""
    root = folder.resolve()
    if root == (folder / relative).resolve() or root in (folder / relative).resolve().parents:
        return None
    return f"media path {relative!r} leaves the data folder {str(folder)!r}: paths are relative to it"


def image_problem(path: Path) -> str | None:
    """Why `path` cannot serve as an image (reads only the header), or None."""
    if not path.is_file():
        return f"image file {str(path)!r} not found"
    try:
        with Image.open(path):
            return None
    except Image.DecompressionBombError as error:
        return too_many_pixels(path, error)
    except (UnidentifiedImageError, OSError) as error:
        return f"image file {str(path)!r} cannot be read ({error})"


def too_many_pixels(path: object, error: Image.DecompressionBombError) -> str:
    """Why PIL refused to open `path`, and what to do: its guard against decompression bombs caps the pixel count."""
    return (
        f"image file {str(path)!r} has too many pixels to open ({error} The limit is twice PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS}): downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def checked_dataset(rows: list[dict], features: datasets.Features, source: str) -> datasets.Dataset:
    """The validated rows, with the source file recorded for later error messages."""
    if not rows:
        raise DataFormatError([f"{source}: no rows"])
    return datasets.Dataset.from_list(rows, info=datasets.DatasetInfo(description=source, features=features))
