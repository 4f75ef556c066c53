"""Task data on disk -> `datasets.Dataset`, every row checked before any training starts.

A continual run trains task after task for hours; a malformed row found in task 5 wastes tasks 1-4. So the
loaders validate the whole file up front and report every bad row at once, each error naming the file, the
row (0-based index, and its "id" when it has one) and the problem.

Chat datasets share one row layout, whatever the source format:
`id` (str), `images` or `videos` (absolute paths), `messages` ([{"role": "user"|"assistant", "content": str}]),
with `<image>` / `<video>` markers left in the text where the visual input goes. The source file is recorded in
`dataset.info.description`, which is how `validate_lengths` names it later.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from .video import VideoReadError, read_frames

__all__ = [
    "DataFormatError",
    "IMAGE_EXTENSIONS",
    "IMAGE_MARKER",
    "VIDEO_MARKER",
    "load_classification",
    "load_llava_json",
    "load_video_qa_json",
    "read_rows",
    "row_name",
    "source_of",
]

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_MAX_LISTED_ERRORS = 20

_CHAT_FEATURES = {
    "id": datasets.Value("string"),
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
}


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
class _Checker:
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


def _outside(folder: Path, relative: str) -> str | None:
    """Why a media path would leave its data folder (`..`, an absolute path, a link out), or None."""
    root = folder.resolve()
    if root == (folder / relative).resolve() or root in (folder / relative).resolve().parents:
        return None
    return f"media path {relative!r} leaves the data folder {str(folder)!r}: paths are relative to it"


def _image_problem(path: Path) -> str | None:
    """Why `path` cannot serve as an image (reads only the header), or None."""
    if not path.is_file():
        return f"image file {str(path)!r} not found"
    try:
        with Image.open(path):
            return None
    except (UnidentifiedImageError, OSError) as error:
        return f"image file {str(path)!r} cannot be read ({error})"


class _VideoProbe:
    """Opens each distinct clip once (rows often share clips), remembering why it failed."""

    def __init__(self) -> None:
        self._problems: dict[Path, str | None] = {}

    def problem(self, path: Path) -> str | None:
        if path not in self._problems:
            if not path.is_file():
                self._problems[path] = f"video file {str(path)!r} not found"
            else:
                try:
                    read_frames(path, 1)
                    self._problems[path] = None
                except VideoReadError as error:
                    self._problems[path] = f"unreadable video: {error}"
        return self._problems[path]


def _paths(value: Any, key: str, required: bool) -> list[str] | str:
    """The row's `key` as a list of relative paths, or an error message. Optional media may be null or []."""
    if value is None or (value == [] and not required):
        return f"missing {key!r}" if required else []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        return f"{key!r} must be a path or a non-empty list of paths, got {value!r}"
    return items


def _conversation(turns: Any, marker: str) -> tuple[list[dict], int] | str:
    """LLaVA `conversations` -> (messages, number of `marker`s in user turns), or an error message.

    `marker` is the dataset's visual marker; the other one would be expanded for a modality the rows lack.
    """
    other = VIDEO_MARKER if marker == IMAGE_MARKER else IMAGE_MARKER
    if not isinstance(turns, list) or not turns:
        return "missing or empty 'conversations'"
    messages = []
    markers = 0
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {position} is not an object"
        speaker = turn.get("from")
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            return f"turn {position}: 'from' must be 'human' or 'gpt', got {speaker!r}"
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            return f"turn {position}: roles must alternate human/gpt starting with human, got {speaker!r}"
        value = turn.get("value")
        if not isinstance(value, str):
            return f"turn {position}: 'value' must be a string, got {type(value).__name__}"
        if role == "assistant":
            if not value.strip():
                return f"turn {position}: empty answer"
            for found in (IMAGE_MARKER, VIDEO_MARKER):
                if found in value:
                    return f"turn {position}: the answer contains {found}"
        else:
            if not value.strip():
                return f"turn {position}: empty question"
            if other in value:
                return f"turn {position}: {other} in a dataset of {marker} rows"
            markers += value.count(marker)
        messages.append({"role": role, "content": value})
    if messages[-1]["role"] != "assistant":
        return "the conversation ends with a human turn that has no answer"
    return messages, markers


def _dataset(rows: list[dict], features: datasets.Features, source: str) -> datasets.Dataset:
    """The validated rows, with the source file recorded for later error messages."""
    if not rows:
        raise DataFormatError([f"{source}: no rows"])
    return datasets.Dataset.from_list(rows, info=datasets.DatasetInfo(description=source, features=features))


def _chat_dataset(rows: list[dict], media_key: str, source: str) -> datasets.Dataset:
    features = datasets.Features({**_CHAT_FEATURES, media_key: datasets.List(datasets.Value("string"))})
    return _dataset(rows, features, source)


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike) -> datasets.Dataset:
    """Load a LLaVA conversation file (JSON list or JSONL) with image paths relative to `image_folder`.

    Rows: `{"id", "image": "a.png" | ["a.png", "b.png"] (optional), "conversations": [{"from": "human",
    "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}, ...]}`; turns alternate, starting with
    the human, and each `<image>` in the human turns stands for the next image, so their counts must match.
    Raises `DataFormatError` listing every invalid row, `FileNotFoundError` if `path` does not exist.
    """
    path = Path(path)
    folder = Path(image_folder)
    checker = _Checker(str(path))
    rows = []
    for index, row in enumerate(read_rows(path)):
        if not isinstance(row, dict):
            checker.add(index, row, f"row is not an object but {type(row).__name__}")
            continue
        images = _paths(row.get("image"), "image", required=False)
        parsed = _conversation(row.get("conversations"), IMAGE_MARKER)
        problems = [p for p in (images, parsed) if isinstance(p, str)]
        if not problems:
            messages, markers = parsed
            if markers != len(images):
                problems.append(f"{markers} {IMAGE_MARKER} marker(s) in the human turns but {len(images)} image(s)")
            escaping = [p for p in (_outside(folder, image) for image in images) if p]
            images = [(folder / image).resolve() for image in images]
            problems += escaping or [p for p in map(_image_problem, images) if p]
        for problem in problems:
            checker.add(index, row, problem)
        if not problems:
            row_id = str(row["id"]) if row.get("id") is not None else str(index)
            rows.append({"id": row_id, "images": [str(i) for i in images], "messages": messages})
    checker.raise_if_any()
    return _chat_dataset(rows, "images", str(path))


def _video_qa_messages(row: dict, num_videos: int) -> tuple[list[dict], int] | str:
    """The question/answer form as a two-turn conversation; `<video>` markers are prepended if absent."""
    question, answer, options = row.get("question"), row.get("answer"), row.get("options")
    if not isinstance(question, str) or not question.strip():
        return "missing or empty 'question'"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return "missing or empty 'answer'"
    if options is not None:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
            return f"'options' must be a non-empty list of strings, got {options!r}"
        question = f"{question}\nOptions: {', '.join(options)}"
    if IMAGE_MARKER in question or IMAGE_MARKER in answer:
        return f"{IMAGE_MARKER} in a dataset of {VIDEO_MARKER} rows"
    if VIDEO_MARKER in answer:
        return f"the answer contains {VIDEO_MARKER}"
    if VIDEO_MARKER not in question:
        question = f"{VIDEO_MARKER}\n" * num_videos + question
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], question.count(
        VIDEO_MARKER
    )


def load_video_qa_json(path: str | os.PathLike, video_folder: str | os.PathLike) -> datasets.Dataset:
    """Load video QA rows (JSON list or JSONL) with clip paths relative to `video_folder`.

    Two row forms: `{"id", "video", "question", "answer", "options": [...] (optional)}`, where options are
    appended to the question as `"\\nOptions: a, b, c"` and a `<video>` marker is put in front when the question
    has none; or `{"id", "video", "conversations": [...]}` like LLaVA, where the human turns must carry one
    `<video>` per clip. Every distinct clip is opened with PyAV and must hold at least one frame.
    """
    path = Path(path)
    folder = Path(video_folder)
    checker = _Checker(str(path))
    probe = _VideoProbe()
    rows = []
    for index, row in enumerate(read_rows(path)):
        if not isinstance(row, dict):
            checker.add(index, row, f"row is not an object but {type(row).__name__}")
            continue
        videos = _paths(row.get("video"), "video", required=True)
        if isinstance(videos, str):
            checker.add(index, row, videos)
            continue
        if "conversations" in row:
            parsed = _conversation(row["conversations"], VIDEO_MARKER)
        else:
            parsed = _video_qa_messages(row, len(videos))
        problems = [parsed] if isinstance(parsed, str) else []
        if not problems:
            messages, markers = parsed
            if markers != len(videos):
                problems.append(f"{markers} {VIDEO_MARKER} marker(s) in the human turns but {len(videos)} video(s)")
        escaping = [p for p in (_outside(folder, video) for video in videos) if p]
        videos = [(folder / video).resolve() for video in videos]
        problems += escaping or [p for p in map(probe.problem, videos) if p]
        for problem in problems:
            checker.add(index, row, problem)
        if not problems:
            row_id = str(row["id"]) if row.get("id") is not None else str(index)
            rows.append({"id": row_id, "videos": [str(v) for v in videos], "messages": messages})
    checker.raise_if_any()
    return _chat_dataset(rows, "videos", str(path))


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
    checker = _Checker(str(source))
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
        problems = [p for p in (label if isinstance(label, str) else None, _outside(base, image)) if p]
        problems = problems or [p for p in [_image_problem(image_path)] if p]
        for problem in problems:
            checker.add(index, row, problem)
        if not problems:
            rows.append({"image": str(image_path), "label": label})
    checker.raise_if_any()
    if not names:
        raise DataFormatError([f"{source}: no rows"])
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return _dataset(rows, features, str(source))
