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

from keeplora_hf.recipes import run_chat_recipe


def main(argv: list[str] | None = None) -> dict:
    return run_chat_recipe(argv, media="image")


if __name__ == "__main__":
    main(sys.argv[1:])
