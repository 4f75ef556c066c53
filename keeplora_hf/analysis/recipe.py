"""`analyze` on what a training recipe trains: its model, its KeepLoRA targets, its tasks and general sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .eval_sets import EvalSet
from .measure import analyze
from .probe import FinetuneSpec

__all__ = ["analyze_recipe"]


def analyze_recipe(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    eval_size: int | None = None,
    finetune: Mapping[str, Any] | None = MappingProxyType({}),
    **options: Any,
) -> dict[str, Any]:
    """`analyze` on what a training recipe (`recipes/*/config_*.yaml`) trains: its model, its targets, its data.

    The model is loaded as the recipe loads it (a chat VLM with its family's processor and collator, or CLIP; a
    `tiny:` model with its tiny data), on the recipe's device. The weights analysed are the recipe's
    `keeplora.target_modules`, matched as peft matches them. Eval sets: every task's eval split (its first
    `eval_size` rows) scored by the task's own metric (generation, or CLIP's zero-shot classification with chance
    1 / classes), and the recipe's `general_sets`, which are the general ones; in a recipe without general sets, the
    tasks other than the probe's stand for them (what the pre-trained model knows of tasks it has not learned). The
    probe trains on the first task's train split: `finetune` holds `FinetuneSpec` fields (`steps`, `rank`, ...,
    `task` for another task), None skips it.

    `overrides`: the recipe's command-line overrides (`["--data_root", "/data/UCIT"]`). `options`: `analyze`'s other
    keyword arguments (`energies`, `groups`, `output_dir`, `seed`, ...).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    from ..data.collators import clip_classification_loss
    from ..recipes import (
        TINY_DATA_WRITERS,
        build_chat_tasks,
        build_classification_tasks,
        chat_collator,
        chat_media,
        keeplora_config,
        load_clip,
        load_vlm,
        parse_recipe_args,
        prepare,
    )

    config = parse_recipe_args(["--config", str(recipe), *overrides])
    entries = [*config.tasks, *config.general_sets]
    classification = any("train" in e or "eval" in e for e in entries)  # CLIP's entries name `train` / `eval`
    eval_field = "eval" if classification else "eval_file"
    missing = [e["name"] for e in entries if not e.get(eval_field)]
    if missing:
        raise ValueError(f"{config.source}: {missing} have no `{eval_field}`; analyze evaluates every task and "
                         "general set on its eval split")
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        raise ValueError(f"{config.source}: tasks and general sets need distinct names, got {names}")
    task_names = [t["name"] for t in config.tasks]
    settings = None if finetune is None else dict(finetune)
    probe = task_names[0] if settings is None else settings.pop("task", task_names[0])
    if probe not in task_names:
        raise ValueError(f"the probe's task {probe!r} is not a task of {config.source}: {task_names}")
    general = [g["name"] for g in config.general_sets] or [n for n in task_names if n != probe]
    if not general:
        raise ValueError(f"{config.source}: analyze needs a general eval set besides the probe's task; add "
                         "`general_sets:` or a second task")
    peft_config, _ = keeplora_config(config.keeplora)

    # the recipe tokenises every row of every task before training; the analysis reads a few batches of one task
    config.data.check_lengths = False
    if classification:
        prepare(config, writer=TINY_DATA_WRITERS["classification"])
        model, processor = load_clip(config.model)
        tasks, general_sets, collator = build_classification_tasks(config, processor)
        loss_fn = clip_classification_loss
    else:
        model, processor, family = load_vlm(config.model)
        media = chat_media(config, family)
        prepare(config, writer=TINY_DATA_WRITERS[media])
        collator = chat_collator(config, processor, family)
        tasks, general_sets = build_chat_tasks(config, collator, media=media)
        loss_fn = None
    if not (config.model.load_in_4bit or config.model.load_in_8bit):  # bitsandbytes places its weights itself
        model.to(config.training.device)
    targets = [name for name, _ in model.named_modules() if check_target_module_exists(peft_config, name)]
    if not targets:
        raise ValueError(f"{config.source}: keeplora.target_modules {peft_config.target_modules!r} matches no "
                         f"module of {config.model.model_name_or_path}")
    eval_sets = {}
    for s in [*tasks, *general_sets]:
        # zero-shot classification picks one of the task's classes; a generated answer has no chance level
        chance = 1 / s.eval_dataset.features["label"].num_classes if classification else 0.0
        eval_sets[s.name] = EvalSet(_first_rows(s.eval_dataset, eval_size), s.metric, chance=chance)
    spec = None
    if settings is not None:
        train = next(t.train_dataset for t in tasks if t.name == probe)
        spec = FinetuneSpec(probe, train, collator, loss_fn=loss_fn, **settings)
    return analyze(model, eval_sets, targets, general=general, finetune=spec, **options)


def _first_rows(dataset: Any, count: int | None) -> Any:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))

