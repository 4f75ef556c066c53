"""KeepLoRA++ continual learning of CLIP on the MTIL image-classification sequence, zero-shot heads throughout.

Each task is classified zero-shot against its class-name prompts ("a photo of a {}."): training minimises the
cross-entropy of every image's similarities to all prompts of its task, and evaluation takes the most similar prompt,
so a task not yet learned is measured exactly as MTIL's Transfer wants it. Transfer / Avg / Last (ZSCL) are printed
at the end and written to results.json with the rest of the runner's metrics. `classifier_heads: true` runs
KeepLoRA++cls: each task also trains a cosine head over the image features, added to its zero-shot logits.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/clip_mtil/train.py recipes/clip_mtil/config_mtil_order1_vitb16.yaml --data_root /data/MTIL

    python recipes/clip_mtil/train.py recipes/clip_mtil/config_tiny.yaml      # tiny CLIP, CPU, seconds

Any key of the YAML file can be overridden on the command line (`--num_train_epochs 10`, `--keeplora.r 8`).
"""

from __future__ import annotations

import sys
from functools import partial

from accelerate import PartialState

from keeplora_hf.data import clip_classification_loss
from keeplora_hf.recipes import (
    ClassifierHeadTrainers,
    build_classification_tasks,
    clip_loss,
    keeplora_config,
    load_clip,
    loaded_whole,
    parse_recipe_args,
    prepare,
    run_recipe,
    write_tiny_classification_data,
)


def main(argv: list[str] | None = None) -> dict:
    config = parse_recipe_args(argv)
    prepare(config, writer=write_tiny_classification_data)
    with loaded_whole(config.training):
        model, processor = load_clip(config.model)
    if config.model.train_projector:
        raise ValueError("CLIP has no vision-language projector to train: set train_projector to false")
    tasks, general, collator = build_classification_tasks(config, processor)

    peft_config, energy_pattern = keeplora_config(config.keeplora)
    # CLIPModel takes no labels: the Trainer's loss and KeepLoRA's statistics passes both score prompts per class
    trainer_kwargs = {"compute_loss_func": clip_loss, "keeplora_loss_fn": clip_classification_loss}
    wrap = None  # KeepLoRA++cls (classifier_heads: true): each task's Trainer also trains the task's cosine head
    if config.recipe.classifier_heads:
        batch_size = config.training.per_device_train_batch_size
        wrap = partial(ClassifierHeadTrainers, collators=collator, batch_size=batch_size)
    results = run_recipe(config, model, tasks, general, collator, trainer_kwargs=trainer_kwargs,
                         principal_energy_pattern=energy_pattern, peft_config=peft_config, wrap_trainers=wrap)
    if PartialState().is_main_process:
        metrics = results["methods"][config.recipe.method_name]["metrics"]
        shown = {k: "-" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k in ("transfer", "avg", "last")}
        print(f"MTIL  Transfer {shown['transfer']}  Avg {shown['avg']}  Last {shown['last']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
