"""Image classification data for CLIP-style tasks, from a folder per class or a CSV / JSON / JSONL table."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from .rows import DataFormatError, RowChecker, checked_dataset, image_problem, outside_folder, read_rows

__all__ = ["IMAGE_EXTENSIONS", "load_classification"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _class_index(label: Any, class_names: list[str] | None) -> int | str:
    """A row's label as a class index, or an error message."""
    if isinstance(label, bool) or label is None or (isinstance(label, str) and not label.strip()):
        return f"invalid label {label!r}"
    if class_names is None:
        return f"integer label {label!r} needs class_names"
    if isinstance(label, str) and label.strip().lstrip("-").isdigit() and label not in class_names:
        label = int(label)
    if isinstance(label, int):
        return label if 0 <= label < len(class_names) else f"label {label} outside 0..{len(class_names) - 1}"
    if isinstance(label, str):
        return class_names.index(label) if label in class_names else f"label {label!r} is not one of class_names"
    return f"invalid label {label!r}"


def _table_rows(path: Path, image_column: str, label_column: str) -> list[Any]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {image_column, label_column} - set(reader.fieldnames or ())
            if missing:
                raise DataFormatError([f"{path}: CSV header lacks column(s) {sorted(missing)}"])
            return list(reader)
    return read_rows(path)


def load_classification(
    source: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.Dataset:
    """Image classification data for CLIP-style tasks: columns `image` (absolute path) and `label` (ClassLabel).

    `source` is either a folder with one sub-folder per class (class names = sorted sub-folder names, unless
    `class_names` fixes the order), or a CSV / JSON / JSONL table of (`image_column`, `label_column`) rows with
    image paths relative to `image_folder` (default: the table's folder). Table labels are class names, or
    integer indices into `class_names`; string labels without `class_names` define the classes in sorted order.
    The class names are `dataset.features["label"].names`.
    """
    source = Path(source)
    checker = RowChecker(str(source))
    names = list(class_names) if class_names is not None else None
    if names is not None and (len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"class_names must be distinct non-empty strings, got {names!r}")
    if source.is_dir():
        folders = sorted(p.name for p in source.iterdir() if p.is_dir())
        if not folders:
            raise DataFormatError([f"{source}: no class sub-folders"])
        if names is None:
            names = folders
        elif set(folders) - set(names):
            raise DataFormatError([f"{source}: sub-folders {sorted(set(folders) - set(names))} not in class_names"])
        raw = [
            {image_column: str(image.resolve()), label_column: folder}
            for folder in folders
            for image in sorted((source / folder).iterdir())
            if image.suffix.lower() in IMAGE_EXTENSIONS
        ]
        base = source
    else:
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such file or folder")
        raw = _table_rows(source, image_column, label_column)
        base = Path(image_folder) if image_folder is not None else source.parent
        if names is None:
            labels = [r.get(label_column) for r in raw if isinstance(r, dict)]
            names = sorted({label for label in labels if isinstance(label, str) and label.strip()})
            names = names or None
    rows = []
    for index, row in enumerate(raw):
        if not isinstance(row, dict):
            checker.add(index, row, f"row is not an object but {type(row).__name__}")
            continue
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            checker.add(index, row, f"missing {image_column!r}")
            continue
        label = _class_index(row.get(label_column), names)
        image_path = (base / image).resolve()
        problems = [p for p in (label if isinstance(label, str) else None, outside_folder(base, image)) if p]
        problems = problems or [p for p in [image_problem(image_path)] if p]
        for problem in problems:
            checker.add(index, row, problem)
        if not problems:
            rows.append({"image": str(image_path), "label": label})
    checker.raise_if_any()
    if not names:
        raise DataFormatError([f"{source}: no rows"])
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return checked_dataset(rows, features, str(source))
