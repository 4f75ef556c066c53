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

from keeplora_hf.recipes import run_chat_recipe


def main(argv: list[str] | None = None) -> dict:
    return run_chat_recipe(argv, media="video")


if __name__ == "__main__":
    main(sys.argv[1:])
