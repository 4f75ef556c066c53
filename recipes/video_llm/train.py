"""KeepLoRA++ continual learning of a video LLM on a sequence of video question-answering tasks.

Models: Video-LLaVA, LLaVA-NeXT-Video, Qwen2-VL / Qwen2.5-VL with video input. Tasks: video-QA JSON files (rows
`{"id", "video", "question", "answer", "options"}` or LLaVA-style `conversations` with `<video>`), clips read with
PyAV and `num_frames` frames sampled uniformly from each, whatever its length. Evaluation: generation, scored per
task (exact match, VQA accuracy, option letter).

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/video_llm/train.py recipes/video_llm/config_clvista_video_llava_7b.yaml --data_root /data/CL-VISTA

    python recipes/video_llm/train.py recipes/video_llm/config_tiny.yaml      # tiny Video-LLaVA, CPU, under a minute

Any key of the YAML file can be overridden on the command line (`--num_frames 16`, `--keeplora.r 32`).
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
    write_tiny_video_data,
)


def main(argv: list[str] | None = None) -> dict:
    config = parse_recipe_args(argv)
    prepare(config, writer=write_tiny_video_data)
    model, processor, family = load_vlm(config.model)
    collator = VLMChatCollator(processor, max_length=config.data.max_length, model_family=family,
                               num_frames=config.data.num_frames)
    # every file is loaded and every row checked (clips open with PyAV, <video> markers, lengths) before training
    tasks, general = build_chat_tasks(config, collator, media="video")

    projector = config.model.projector_modules or PROJECTOR_MODULES[family]
    peft_config, energy_pattern = keeplora_config(config.keeplora, projector if config.model.train_projector else ())
    trainer_kwargs = {}
    if config.model.train_projector:
        trainer_kwargs.update(projector_optimizer(config.training, config.model.projector_learning_rate))
    return run_recipe(config, model, tasks, general, collator, trainer_kwargs=trainer_kwargs,
                      principal_energy_pattern=energy_pattern, peft_config=peft_config)


if __name__ == "__main__":
    main(sys.argv[1:])
