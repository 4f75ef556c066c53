"""The embedded CLIP classification sequence (`keeplora-hf demo --clip`): MTIL's setting on the pre-trained demo CLIP.

Five tasks (`CLIP_TASKS`: images like the chat benchmark's, classified against "<question> <answer>" prompts),
learned one after the other; each is evaluated zero-shot before it is learned, which is MTIL's Transfer, and after every task (Avg, Last).
The two general skills the CLIP was pre-trained on are the general sets (general retention). KeepLoRA++cls adds a
cosine head per task (`keeplora_hf.tuner.heads`), as recipes/clip_mtil does with `classifier_heads: true`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .continual import ContinualTask, GeneralSet
from .data.collators import ClipCollator, clip_classification_loss
from .data.synthetic.classification import (
    CLIP_GENERAL_SKILLS,
    CLIP_TASKS,
    class_prompt,
    load_clip_benchmark,
    skill_spec,
    write_clip_benchmark,
)
from .harness import Budget, Sequence
from .models.demo_clip import DEMO_CLIP_TARGETS, load_demo_clip
from .recipes.clip import ClassifierHeadTrainers, TaskClipCollator, clip_loss, clip_zero_shot_metric

__all__ = ["clip_data", "clip_sequence"]

EVAL_BATCH_SIZE = 128


def clip_data(data_dir: Path, tasks: tuple[str, ...], *, train_size: int, eval_size: int, general_size: int,
              seed: int = 0) -> dict[str, Any]:
    """The CLIP benchmark's `tasks` and general skills, written once into `data_dir` and read back (every task order
    of a run shares one load)."""
    write_clip_benchmark(data_dir, train_size=train_size, eval_size=eval_size, general_size=general_size, seed=seed)
    return load_clip_benchmark(data_dir, tasks)


def clip_sequence(data: dict[str, Any], budget: Budget, recorded: dict[str, Any], *, model_path: str | None = None,
                  tasks: tuple[str, ...] = CLIP_TASKS, name: str = "clip") -> Sequence:
    """The CLIP sequence over `tasks` (in that order) of `data` (`clip_data`)."""
    _, processor = load_demo_clip(model_path)
    collators = {n: ClipCollator(processor, list(skill_spec(n).answers), class_prompt(n))
                 for n in (*tasks, *CLIP_GENERAL_SKILLS)}
    collator = TaskClipCollator(collators)
    sequence_tasks = [
        ContinualTask(n, data["tasks"][n]["train"], data["tasks"][n]["eval"],
                      clip_zero_shot_metric(collators[n], EVAL_BATCH_SIZE, task=n))
        for n in tasks
    ]
    general = [GeneralSet(s, data["general"][s], clip_zero_shot_metric(collators[s], EVAL_BATCH_SIZE))
               for s in CLIP_GENERAL_SKILLS]
    return Sequence(
        name, sequence_tasks, general, collator, lambda: load_demo_clip(model_path)[0], budget, DEMO_CLIP_TARGETS,
        recorded,
        # CLIPModel takes no labels: the Trainer's loss and KeepLoRA's statistics passes both score class prompts
        trainer_kwargs={"compute_loss_func": clip_loss},
        keeplora_kwargs={"keeplora_loss_fn": clip_classification_loss},
        classifier_heads=lambda trainers: ClassifierHeadTrainers(trainers, collator, budget.batch_size),
        one_task_batches=True,
    )
