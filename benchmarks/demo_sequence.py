"""A short continual sequence on the shipped demo VLM, driven by begin_task / a few AdamW steps / end_task.

Used by `state_size_7b.py` (ranks the state reaches on a pre-trained model) and `state_dtype.py` (what a bfloat16
state costs). It is the demo's KeepLoRA++ (`keeplora_hf.demo`: r = 8, alpha = 16, the demo's targets, AdamW at
lr 5e-3, batches of 32, statistics passes on `gradient_data_ratio` = 0.2 of a task's training set) with fewer steps.

Tasks: the six image tasks of the demo benchmark in their default order, then two tasks drawn from the general skills
(the pre-training distribution, which the continual tasks never trained on): `general_place` (side and height
questions) and `general_objects` (count and presence questions), so that eight tasks exist.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader

from keeplora_hf import KeepLoRAConfig, begin_task, end_task
from keeplora_hf.data.collators import VLMChatCollator
from keeplora_hf.data.formats import load_llava_json
from keeplora_hf.data.synthetic.tasks import IMAGE_TASKS, Sample, general_samples, make_task, task_rng
from keeplora_hf.data.synthetic.writer import write_llava_json
from keeplora_hf.models.demo import DEMO_LANGUAGE_TARGETS, DEMO_TARGETS, load_demo_model
from keeplora_hf.models.pretrain import MAX_LENGTH

GENERAL_TASKS = {"general_place": ("side", "height"), "general_objects": ("count", "presence")}
SEQUENCE: tuple[str, ...] = (*IMAGE_TASKS, *GENERAL_TASKS)
RANK, ALPHA, LEARNING_RATE, BATCH_SIZE, STATISTICS_RATIO = 8, 16.0, 5e-3, 32, 0.2


def task_datasets(names: tuple[str, ...], size: int, folder: Path, seed: int = 0) -> dict[str, Dataset]:
    """`size` training samples of each task, written once as LLaVA JSON under `folder` and loaded as the demo does."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        path = folder / f"{name}_train{size}.json"
        if not path.exists():
            samples = make_task(name, "train", size, seed) if name in IMAGE_TASKS else general_task(name, size, seed)
            write_llava_json(samples, folder, f"{name}_train{size}")
        out[name] = load_llava_json(path, folder)
    return out


def general_task(name: str, n: int, seed: int = 0) -> list[Sample]:
    """`n` questions of the general skills `GENERAL_TASKS[name]`, skills and answers balanced."""
    return general_samples(n, task_rng(seed, name, "train"), GENERAL_TASKS[name])


def demo_keeplora(dtype: torch.dtype = torch.float32, *, language_only: bool = False, **overrides):
    """The pre-trained demo model in `dtype`, wrapped as the demo wraps it for KeepLoRA++; and its collator."""
    base, processor = load_demo_model()
    base = base.to(dtype)
    settings = dict(r=RANK, lora_alpha=ALPHA, target_modules=DEMO_LANGUAGE_TARGETS if language_only else DEMO_TARGETS)
    settings.update(overrides)
    model = get_peft_model(base, KeepLoRAConfig(**settings))
    collator = VLMChatCollator(processor, max_length=MAX_LENGTH, model_family="llava")
    return model, collator


def _loader(dataset: Dataset, collator, indices: list[int]) -> DataLoader:
    return DataLoader(dataset.select(indices), batch_size=BATCH_SIZE, shuffle=False, collate_fn=collator)


def run_task(model, dataset: Dataset, collator, *, steps: int, seed: int, after_begin=None, before_end=None) -> dict:
    """begin_task on the statistics subset, `steps` AdamW steps on shuffled batches, end_task on the same subset.

    `after_begin(model)` runs right after begin_task, `before_end(model)` after training, before end_task. Returns the
    training loss of the first and last steps.
    """
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    statistics = _loader(dataset, collator, order[: max(BATCH_SIZE, round(STATISTICS_RATIO * len(dataset)))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        begin_task(model, statistics, max_batches=len(statistics))
        if after_begin is not None:
            after_begin(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                      weight_decay=0.0)
        model.train()
        losses = []
        batches = iter(())
        for step in range(steps):
            batch = next(batches, None)
            if batch is None:
                random.Random(seed + step).shuffle(order)
                batches = iter(_loader(dataset, collator, order))
                batch = next(batches)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        if before_end is not None:
            before_end(model)
        end_task(model, statistics, max_batches=len(statistics))
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def held_out(dataset: Dataset, collator, count: int, seed: int) -> DataLoader:
    """The last `count` samples of the task's shuffled order: never in the statistics subset, which is the first
    `STATISTICS_RATIO` of the first shuffle (`run_task` with the same seed)."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return _loader(dataset, collator, order[-count:])


@torch.no_grad()
def mean_loss(model, loader: DataLoader) -> float:
    model.eval()
    losses = [float(model(**batch).loss) for batch in loader]
    return sum(losses) / len(losses)
