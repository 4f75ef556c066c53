"""Chat task data on disk (LLaVA conversations, video QA) -> `datasets.Dataset`, every row checked before any
training starts (see `rows`).

Chat datasets share one row layout, whatever the source format:
`id` (str), `images` or `videos` (absolute paths), `messages` ([{"role": "user"|"assistant", "content": str}]),
with `<image>` / `<video>` markers left in the text where the visual input goes. The source file is recorded in
`dataset.info.description`, which is how `validate_lengths` names it later.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from .rows import RowChecker, checked_dataset, image_problem, outside_folder, read_rows
from .video import VideoReadError, read_frames

__all__ = ["IMAGE_MARKER", "VIDEO_MARKER", "load_llava_json", "load_video_qa_json"]

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

_CHAT_FEATURES = {
    "id": datasets.Value("string"),
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
}

#: what a row check returns: its problems, or else its media as absolute paths and its messages
_RowCheck = tuple[list[str], list[Path], list[dict] | None]


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


def _media(folder: Path, relative: list[str], problem: Callable[[Path], str | None]) -> tuple[list[Path], list[str]]:
    """The media as absolute paths, and why they cannot serve: paths leaving `folder`, or else unreadable files."""
    escaping = [p for p in (outside_folder(folder, item) for item in relative) if p]
    paths = [(folder / item).resolve() for item in relative]
    return paths, escaping or [p for p in map(problem, paths) if p]


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


def _load_chat(path: Path, media_key: str, check_row: Callable[[dict], _RowCheck]) -> datasets.Dataset:
    """Check every row of `path` with `check_row`, raise `DataFormatError` listing every problem, else the rows in the
    chat layout with their media under `media_key`."""
    checker = RowChecker(str(path))
    rows = []
    for index, row in enumerate(read_rows(path)):
        if not isinstance(row, dict):
            checker.add(index, row, f"row is not an object but {type(row).__name__}")
            continue
        problems, media, messages = check_row(row)
        for problem in problems:
            checker.add(index, row, problem)
        if not problems:
            row_id = str(row["id"]) if row.get("id") is not None else str(index)
            rows.append({"id": row_id, media_key: [str(m) for m in media], "messages": messages})
    checker.raise_if_any()
    features = datasets.Features({**_CHAT_FEATURES, media_key: datasets.List(datasets.Value("string"))})
    return checked_dataset(rows, features, str(path))


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike) -> datasets.Dataset:
    """Load a LLaVA conversation file (JSON list or JSONL) with image paths relative to `image_folder`.

    Rows: `{"id", "image": "a.png" | ["a.png", "b.png"] (optional), "conversations": [{"from": "human",
    "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}, ...]}`; turns alternate, starting with
    the human, and each `<image>` in the human turns stands for the next image, so their counts must match.
    Raises `DataFormatError` listing every invalid row, `FileNotFoundError` if `path` does not exist.
    """
    return _load_chat(Path(path), "images", functools.partial(_llava_row, folder=Path(image_folder)))


def _llava_row(row: dict, *, folder: Path) -> _RowCheck:
    """Its image paths and its conversation are checked first; the image files only once both are well formed."""
    images = _paths(row.get("image"), "image", required=False)
    parsed = _conversation(row.get("conversations"), IMAGE_MARKER)
    problems = [p for p in (images, parsed) if isinstance(p, str)]
    if problems:
        return problems, [], None
    messages, markers = parsed
    if markers != len(images):
        problems.append(f"{markers} {IMAGE_MARKER} marker(s) in the human turns but {len(images)} image(s)")
    paths, unusable = _media(folder, images, image_problem)
    return problems + unusable, paths, messages


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
    check_row = functools.partial(_video_qa_row, folder=Path(video_folder), probe=_VideoProbe())
    return _load_chat(Path(path), "videos", check_row)


def _video_qa_row(row: dict, *, folder: Path, probe: _VideoProbe) -> _RowCheck:
    """Nothing more is checked once its video paths are malformed; its clips are checked even when its text is not."""
    videos = _paths(row.get("video"), "video", required=True)
    if isinstance(videos, str):
        return [videos], [], None
    if "conversations" in row:
        parsed = _conversation(row["conversations"], VIDEO_MARKER)
    else:
        parsed = _video_qa_messages(row, len(videos))
    problems = [parsed] if isinstance(parsed, str) else []
    messages = None
    if not problems:
        messages, markers = parsed
        if markers != len(videos):
            problems.append(f"{markers} {VIDEO_MARKER} marker(s) in the human turns but {len(videos)} video(s)")
    paths, unusable = _media(folder, videos, probe.problem)
    return problems + unusable, paths, messages
