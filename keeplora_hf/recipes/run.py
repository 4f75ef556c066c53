"""A recipe's run: set-up, KeepLoRA around the model, `ContinualRunner` over the task sequence."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from peft import get_peft_model
from torch import nn

from ..continual import ContinualRunner, ContinualTask, GeneralSet
from ..tuner.config import KeepLoRAConfig
from .adapter import keeplora_config, seed_principal_energy
from .arguments import RecipeConfig, parse_recipe_args
from .distributed import loaded_whole, refuse_unsupported_sharding
from .loading import PROJECTOR_MODULES, load_vlm
from .task_trainer import TaskTrainers
from .tasks import build_chat_tasks, chat_collator
from .tiny_data import TINY_DATA_WRITERS

logger = logging.getLogger(__name__)

__all__ = ["prepare", "run_chat_recipe", "run_recipe"]


def prepare(config: RecipeConfig, writer: Callable[[Path], None] | None = None) -> PartialState:
    """Logging, the distributed state, refusal of sharded parameters, and the tiny data set when asked for."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_unsupported_sharding(config.training)  # first: before any distributed state is set up
    _ = config.training.device  # sets up the distributed state the way the Trainer will
    state = PartialState()
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # the collators read the rows' own columns (messages, images, videos, task), which the model's forward lacks
    config.training.remove_unused_columns = False
    if config.data.tiny_data and writer is not None:
        with state.main_process_first():
            if state.is_main_process:
                writer(Path(config.data.data_root))
    return state


def run_recipe(
    config: RecipeConfig,
    model: nn.Module,
    tasks: list[ContinualTask],
    general: list[GeneralSet],
    collator: Callable,
    *,
    trainer_kwargs: dict[str, Any] | None = None,
    principal_energy_pattern: dict[str, float] | None = None,
    peft_config: KeepLoRAConfig,
    wrap_trainers: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
) -> dict[str, Any]:
    """Wrap `model` with KeepLoRA, run the sequence with `ContinualRunner`, return (and write) the results.

    Each task is trained with its own `learning_rate` / `num_train_epochs` where its `tasks:` entry sets them, the
    projector at `projector_learning_rate` when it is trained, and OneCycleLR when `lr_schedule` asks for it.
    `wrap_trainers` wraps that per-task Trainer factory (the CLIP recipe's classifier heads).
    """
    training = config.training
    if getattr(training, "activation_checkpointing", training.gradient_checkpointing) and hasattr(
        model, "enable_input_require_grads"
    ):
        model.enable_input_require_grads()  # the frozen embeddings must still pass gradients to checkpointed blocks
    peft_model = get_peft_model(model, peft_config)
    seeded = seed_principal_energy(peft_model, principal_energy_pattern or {})
    if seeded:
        logger.info("principal_energy_pattern: %d targets use their own epsilon_w", len(seeded))
    if PartialState().is_main_process:
        peft_model.print_trainable_parameters()
    trainers = TaskTrainers(
        tasks, config.task_training(),
        projector_lr=config.model.projector_learning_rate if config.model.train_projector else None,
        one_cycle=config.recipe.lr_schedule == "one_cycle",
    )
    runner = ContinualRunner(
        peft_model,
        tasks,
        training,
        training.output_dir,
        general_sets=general,
        data_collator=collator,
        method=config.recipe.method_name,
        run_config={"recipe": config.describe()},
        overwrite=config.recipe.overwrite_run,
        trainer_kwargs=trainer_kwargs,
        trainer_class=wrap_trainers(trainers) if wrap_trainers is not None else trainers,
    )
    return runner.run()


def run_chat_recipe(argv: Sequence[str] | None, media: str) -> dict[str, Any]:
    """A chat recipe's whole run on `media` ("image": recipes/llava_vqa, "video": recipes/video_llm).

    Arguments, the tiny data when asked for, the model, every task loaded and checked before training (files,
    `<image>` / `<video>` markers and media, conversations, lengths), then KeepLoRA++ over the sequence.
    """
    config = parse_recipe_args(argv)
    if config.recipe.classifier_heads:
        raise ValueError("classifier_heads is KeepLoRA++cls, for CLIP classification (recipes/clip_mtil) only")
    prepare(config, writer=TINY_DATA_WRITERS[media])
    with loaded_whole(config.training):
        model, processor, family = load_vlm(config.model)
    collator = chat_collator(config, processor, family)
    tasks, general = build_chat_tasks(config, collator, media=media)

    projector = config.model.projector_modules or PROJECTOR_MODULES[family]
    peft_config, energy_pattern = keeplora_config(config.keeplora, projector if config.model.train_projector else ())
    return run_recipe(config, model, tasks, general, collator, principal_energy_pattern=energy_pattern,
                      peft_config=peft_config)
