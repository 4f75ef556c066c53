"""A recipe's `tasks:` and `general_sets:` as runner tasks: every file loaded and checked before any training."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from ..continual import ContinualTask, GeneralSet
from ..continual.generation import NORMALIZERS, generation_metric
from ..data.collators import ClipCollator, VLMChatCollator, validate_lengths
from ..data.classification import load_classification
from ..data.formats import load_llava_json, load_video_qa_json
from ..data.rows import DataFormatError, read_rows, row_name, source_of
from ..distributed import gather_lists, rank_and_world
from .arguments import TASK_TRAINING_KEYS, RecipeConfig
from .clip import TaskClipCollator, clip_zero_shot_metric
from .loading import VIDEO_FAMILIES

__all__ = ["build_chat_tasks", "build_classification_tasks", "chat_collator", "chat_media"]


def _path(root: str, value: str | None, what: str, task: str) -> Path:
    if not value:
        raise ValueError(f"task {task!r}: `{what}` is required")
    path = Path(value)
    # absolute: load_classification joins a class-folder tree's relative image paths onto the tree once more
    return (path if path.is_absolute() else Path(root) / path).resolve()


def _with_extra_columns(
    dataset: datasets.Dataset, path: Path, columns: Sequence[str] = ("answers",)
) -> datasets.Dataset:
    """Carry columns the loaders drop (the `answers` list of VQA-style rows) from the file into the dataset.

    The loaders keep every row of a valid file in order, so row `i` of the dataset is row `i` of the file.
    """
    raw = read_rows(path)
    for column in columns:
        if not any(isinstance(r, dict) and column in r for r in raw):
            continue
        values, errors = [], []
        for index, row in enumerate(raw):
            value = row.get(column)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
                errors.append(f"{row_name(str(path), index, row)}: {column!r} must be a non-empty list of answers "
                              f"when other rows have one, got {value!r}")
                continue
            values.append([str(v) for v in value])
        if errors:
            raise DataFormatError(errors)
        dataset = dataset.add_column(column, values)
    return dataset


def _limit(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


def _check_lengths(dataset: datasets.Dataset, collator: VLMChatCollator) -> list[str]:
    """`validate_lengths`, spread over the ranks, with the file's own row numbers in every message."""
    rank, world = rank_and_world()
    source = source_of(dataset)
    errors = []
    for index in range(rank, len(dataset), world):
        row = dataset[index]
        try:
            validate_lengths([row], collator)
        except DataFormatError as error:
            local = row_name("<dataset>", 0, row)
            errors += [row_name(source, index, row) + e[len(local) :] for e in error.errors]
    return errors


def _sort_errors(errors: list[str]) -> list[str]:
    def key(message: str) -> tuple[str, int]:
        found = re.search(r"^(.*?): row (\d+)", message)
        return (found.group(1), int(found.group(2))) if found else (message, 0)

    return sorted(errors, key=key)


def chat_collator(config: RecipeConfig, processor: Any, family: str) -> VLMChatCollator:
    """The recipe's training collator; generation-based evaluation renders the same rows through its twin."""
    return VLMChatCollator(processor, max_length=config.data.max_length, model_family=family,
                           num_frames=config.data.num_frames)


def chat_media(config: RecipeConfig, family: str) -> str:
    """"image" or "video": what a chat recipe's tasks hold, for callers that have only its config (the scripts know).

    A task's `video_folder` / `image_folder` says it; without either, the model's family does (Video-LLaVA and
    LLaVA-NeXT-Video read clips, the others images).
    """
    for media in ("video", "image"):
        if any(f"{media}_folder" in entry for entry in [*config.tasks, *config.general_sets]):
            return media
    return "video" if family in VIDEO_FAMILIES else "image"


def build_chat_tasks(
    config: RecipeConfig, collator: VLMChatCollator, media: str
) -> tuple[list[ContinualTask], list[GeneralSet]]:
    """Load, check and wrap every task of the config, before any training: one error lists every bad row.

    Each task entry: `name`, `train_file`, `eval_file`, `image_folder` (or `video_folder`; default: data_root),
    `metric` (a normaliser of `generation_metric`: exact_match, vqa, multiple_choice, token_f1), optional
    `max_new_tokens`, `eval_max_samples`, and the task's own `learning_rate` / `num_train_epochs`. General sets:
    `name`, `eval_file`, folder, `metric`.
    """
    if media not in ("image", "video"):
        raise ValueError(f"media must be image or video, got {media!r}")
    data = config.data
    loader = load_llava_json if media == "image" else load_video_qa_json
    folder_key = f"{media}_folder"
    errors: list[str] = []
    loaded: dict[tuple[str, str], datasets.Dataset] = {}

    def load(entry: dict[str, Any], split: str) -> None:
        file = _path(data.data_root, entry.get(f"{split}_file"), f"{split}_file", entry["name"])
        folder = _path(data.data_root, entry.get(folder_key) or ".", folder_key, entry["name"])
        try:
            dataset = _with_extra_columns(loader(file, folder), file)
        except DataFormatError as error:
            errors.extend(error.errors)
            return
        limit = data.train_max_samples if split == "train" else entry.get("eval_max_samples", data.eval_max_samples)
        loaded[(entry["name"], split)] = _limit(dataset, limit)

    known = {"name", "train_file", "eval_file", folder_key, "metric", "max_new_tokens", "eval_max_samples"}
    for entry, splits in [(t, ("train", "eval")) for t in config.tasks] + [(g, ("eval",)) for g in config.general_sets]:
        unknown = sorted(set(entry) - known - (set(TASK_TRAINING_KEYS) if "train" in splits else set()))
        if unknown:
            raise ValueError(
                f"{config.source}: task {entry['name']!r} has unknown keys {unknown}; known: {sorted(known)}"
            )
        if entry.get("metric", "exact_match") not in NORMALIZERS:
            raise ValueError(
                f"task {entry['name']!r}: metric must be one of {sorted(NORMALIZERS)}, got {entry['metric']!r}"
            )
        for split in splits:
            load(entry, split)
    if data.check_lengths:  # the files that loaded are measured too, so one error lists every problem
        lengths: list[str] = []
        for dataset in loaded.values():
            lengths += _check_lengths(dataset, collator)
        errors += _sort_errors(gather_lists(lengths))
    if errors:
        raise DataFormatError(errors)

    def metric(entry: dict[str, Any]):
        return generation_metric(
            collator,
            entry.get("metric", "exact_match"),
            batch_size=data.eval_batch_size,
            max_new_tokens=int(entry.get("max_new_tokens", data.max_new_tokens)),
        )

    tasks = [
        ContinualTask(t["name"], loaded[(t["name"], "train")], loaded[(t["name"], "eval")], metric(t))
        for t in config.tasks
    ]
    general = [GeneralSet(g["name"], loaded[(g["name"], "eval")], metric(g)) for g in config.general_sets]
    return tasks, general


def _class_names(entry: dict[str, Any], root: str) -> list[str] | None:
    names = entry.get("class_names")
    if isinstance(names, str):  # a file: one name per line, or a JSON list
        path = _path(root, names, "class_names", entry["name"])
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            names = json.loads(text)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    return names


def build_classification_tasks(
    config: RecipeConfig, processor: Any
) -> tuple[list[ContinualTask], list[GeneralSet], TaskClipCollator]:
    """CLIP tasks: `name`, `train` / `eval` (a class-folder tree, or a CSV/JSON table with `image_folder`),
    optional `class_names` (a list, or a file of one name per line / a JSON list, relative to `class_names_dir`),
    `prompt` ("a photo of a {}.") and the task's own `learning_rate` / `num_train_epochs`."""
    data = config.data
    errors: list[str] = []
    known = {"name", "train", "eval", "image_folder", "class_names", "prompt"}
    collators, loaded = {}, {}
    entries = [(t, ("train", "eval")) for t in config.tasks] + [(g, ("eval",)) for g in config.general_sets]
    for entry, splits in entries:
        unknown = sorted(set(entry) - known - (set(TASK_TRAINING_KEYS) if "train" in splits else set()))
        if unknown:
            raise ValueError(
                f"{config.source}: task {entry['name']!r} has unknown keys {unknown}; known: {sorted(known)}"
            )
        names = _class_names(entry, data.class_names_dir or data.data_root)
        folder = entry.get("image_folder")
        for split in splits:
            source = _path(data.data_root, entry.get(split), split, entry["name"])
            try:
                images = _path(data.data_root, folder, "image_folder", entry["name"]) if folder else None
                dataset = load_classification(source, images, names)
            except DataFormatError as error:
                errors.extend(error.errors)
                continue
            names = names or dataset.features["label"].names
            if split == "train":
                dataset = _limit(dataset, data.train_max_samples)
            else:
                dataset = _limit(dataset, data.eval_max_samples)
            loaded[(entry["name"], split)] = dataset.add_column("task", [entry["name"]] * len(dataset))
        if names is not None:
            collators[entry["name"]] = ClipCollator(processor, names, entry.get("prompt", data.clip_prompt))
    if errors:
        raise DataFormatError(errors)
    tasks = [
        ContinualTask(t["name"], loaded[(t["name"], "train")], loaded[(t["name"], "eval")],
                      clip_zero_shot_metric(collators[t["name"]], data.eval_batch_size, task=t["name"]))
        for t in config.tasks
    ]
    general = [
        GeneralSet(g["name"], loaded[(g["name"], "eval")],
                   clip_zero_shot_metric(collators[g["name"]], data.eval_batch_size))
        for g in config.general_sets
    ]
    return tasks, general, TaskClipCollator(collators)
