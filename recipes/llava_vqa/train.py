"""KeepLoRA++ continual visual instruction tuning of a LLaVA-style multimodal LLM on a sequence of VQA tasks.

Models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL (and any Hugging Face VLM whose targets are nn.Linear and whose
processor is one of the collator families). Tasks: LLaVA conversation JSON files with image folders, one entry per
task under `tasks:` in the config. Evaluation: generation, scored per task (exact match, VQA accuracy, option letter).

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/llava_vqa/train.py recipes/llava_vqa/config_ucit_llava15_7b.yaml --data_root /data/UCIT

    python recipes/llava_vqa/train.py recipes/llava_vqa/config_tiny.yaml      # tiny LLaVA, CPU, under a minute

Any key of the YAML file can be overridden on the command line (`--learning_rate 1e-4`, `--keeplora.r 16`).
"""

from __future__ import annotations

import sys

from keeplora_hf.data import VLMChatCollator
from keeplora_hf.recipes_common import (
    PROJECTOR_MODULES,
    build_chat_tasks,
    keeplora_config,
    load_vlm,
    parse_recipe_args,
    prepare,
    projector_optimizer,
    run_recipe,
    write_tiny_vqa_data,
)


def main(argv: list[str] | None = None) -> dict:
    config = parse_recipe_args(argv)
    prepare(config, writer=write_tiny_vqa_data)
    model, processor, family = load_vlm(config.model)
    collator = VLMChatCollator(processor, max_length=config.data.max_length, model_family=family,
                               num_frames=config.data.num_frames)
    # every file is loaded and every row checked (images, <image> markers, conversation, length) before training
    tasks, general = build_chat_tasks(config, collator, media="image")

    projector = config.model.projector_modules or PROJECTOR_MODULES[family]
    peft_config, energy_pattern = keeplora_config(config.keeplora, projector if config.model.train_projector else ())
    trainer_kwargs = {}
    if config.model.train_projector:
        trainer_kwargs.update(projector_optimizer(config.training, config.model.projector_learning_rate))
    return run_recipe(config, model, tasks, general, collator, trainer_kwargs=trainer_kwargs,
                      principal_energy_pattern=energy_pattern, peft_config=peft_config)


if __name__ == "__main__":
    main(sys.argv[1:])
