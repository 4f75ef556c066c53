"""The synthetic benchmark as CLIP classification: the image tasks and general skills, each a class table.

A task's classes are its answers, and its class prompts are "<question> <answer>" (`class_prompt`), so the text
tower tells tasks that reuse answer words apart (`frame_colour`'s "red" is not `colour`'s). Pre-training teaches the
general skills (`CLIP_GENERAL_SKILLS`); the tasks then reuse their answers for other cues, which the zero-shot model
partly reads already.

The images are the chat benchmark's (same generator, seed and split), written as PNG files with an `image,label` CSV
per task and split, and read back through `load_classification`, the loader for users' data.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from ...continual.checkpoint import atomic_directory
from ..classification import load_classification
from .tasks import (
    CLIP_TASK_SPECS,
    GENERAL_SKILLS,
    IMAGE_TASKS,
    SPLITS,
    Sample,
    TaskSpec,
    general_samples,
    make_task,
    task_rng,
    task_spec,
)

__all__ = ["CLIP_CANDIDATE_TASKS", "CLIP_FORMAT", "CLIP_TASKS", "CLIP_GENERAL_SKILLS", "class_prompt", "clip_general_samples", "load_clip_benchmark",
           "skill_spec", "write_clip_benchmark"]

# What pre-training teaches the demo CLIP. Not side and height: CLIP reads an image through its class token, and
# pre-training on them alone stayed at a guess's loss (ln 2) for 600 steps at learning rates 1e-3 to 4e-3 (the
# chat model reads them from every patch); not presence: its question names a colour per image.
CLIP_GENERAL_SKILLS: tuple[str, ...] = ("colour", "count")
# Every task written for the CLIP sequence: the chat benchmark's six and two of its own. Which of them the sequence
# learns (`CLIP_TASKS`) follows the benchmark's rule: single-task LoRA at least 10 points above chance (docs/results.md).
CLIP_CANDIDATE_TASKS: tuple[str, ...] = IMAGE_TASKS + tuple(CLIP_TASK_SPECS)
# The sequence, in its default order (count and colour tasks alternate). Left out by the rule (single-task LoRA, 3
# seeds, the image sequence's budget): red_side 45.8 and above_below 48.9 of 50, digits 25.0 of 25 — CLIP's class
# token did not learn where things are nor a digit's shape, as its pre-training did not learn side and height.
CLIP_TASKS: tuple[str, ...] = ("count_red", "frame_colour", "colour_count", "bigger_colour", "smaller_colour")
CLIP_FORMAT = "keeplora-clip/1"  # the images are of keeplora-synthetic/2 (the redrawn red_side and above_below)
_MANIFEST = "manifest.json"


def skill_spec(name: str) -> TaskSpec:
    """The TaskSpec of a task or a general skill of the CLIP benchmark."""
    if name in CLIP_GENERAL_SKILLS:
        return GENERAL_SKILLS[name]
    if name in CLIP_CANDIDATE_TASKS:
        return task_spec(name)
    raise ValueError(f"unknown task or skill {name!r}; choose from {(*CLIP_CANDIDATE_TASKS, *CLIP_GENERAL_SKILLS)}")


def class_prompt(name: str) -> str:
    """The prompt template of `name`'s classes: its question, then the answer (`ClipCollator`'s `{}`)."""
    return f"{skill_spec(name).question} {{}}"


def clip_general_samples(skill: str, split: str, n: int, seed: int = 0) -> list[Sample]:
    """`n` samples of one general skill (its own random stream per split: "train" for pre-training, "eval" held out)."""
    return general_samples(n, task_rng(seed, f"clip-{skill}", split), skills=(skill,))


def _write_table(samples: list[Sample], folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    rows = []
    for index, sample in enumerate(samples):
        sample.image.save(folder / "images" / f"{index}.png", format="PNG")
        rows.append((f"{folder.name}/images/{index}.png", sample.answer))  # relative to the table's folder
    with (folder.with_suffix(".csv")).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows)


def write_clip_benchmark(data_dir: str | os.PathLike, *, train_size: int, eval_size: int, general_size: int,
                         seed: int = 0) -> Path:
    """Write every task's train/eval table and every general skill's eval table under `data_dir`, whole or not at all
    (an existing benchmark of other settings is refused, not overwritten)."""
    data_dir = Path(data_dir)
    settings = {"format": CLIP_FORMAT, "train_size": train_size, "eval_size": eval_size,
                "general_size": general_size, "seed": seed}
    manifest = data_dir / _MANIFEST
    if manifest.exists():
        written = json.loads(manifest.read_text())
        if written != settings:
            raise ValueError(f"{data_dir} holds a CLIP benchmark of other settings ({written}, asked {settings}); "
                             "choose another --output-dir")
        return data_dir
    with atomic_directory(data_dir) as staging:
        for name in CLIP_CANDIDATE_TASKS:
            for split, size in zip(SPLITS, (train_size, eval_size)):
                _write_table(make_task(name, split, size, seed), staging / name / split)
        per_skill = max(1, general_size // len(CLIP_GENERAL_SKILLS))
        for skill in CLIP_GENERAL_SKILLS:
            _write_table(clip_general_samples(skill, "eval", per_skill, seed), staging / "general" / skill)
        (staging / _MANIFEST).write_text(json.dumps(settings, indent=2) + "\n")
    return data_dir


def load_clip_benchmark(data_dir: str | os.PathLike, tasks: Sequence[str] = CLIP_CANDIDATE_TASKS) -> dict[str, Any]:
    """{"tasks": {task: {split: Dataset}}, "general": {skill: Dataset}} for `tasks` and every general skill; every
    row carries its `task` (or skill)."""
    data_dir = Path(data_dir)

    def load(name: str, table: Path) -> datasets.Dataset:
        dataset = load_classification(table, class_names=skill_spec(name).answers)
        return dataset.add_column("task", [name] * len(dataset))

    return {
        "tasks": {n: {split: load(n, data_dir / n / f"{split}.csv") for split in SPLITS} for n in tasks},
        "general": {skill: load(skill, data_dir / "general" / f"{skill}.csv") for skill in CLIP_GENERAL_SKILLS},
    }
