"""KeepLoRA++ with TRL's SFTTrainer: a sequence of LLaVA-JSON VQA tasks, each trained the way TRL trains VLMs.

What a TRL user adds is the KeepLoRA config and `ContinualRunner(..., trainer_class=SFTTrainer)`, which attaches
a `KeepLoRACallback` to every task's trainer (begin the task, keep `A` in its residual, end the task), evaluates
every task after each one and checkpoints the sequence (resumable: run the same command again).

    python recipes/trl_sft/train.py recipes/trl_sft/config_tiny.yaml            # the shipped demo VLM, CPU, ~1 min
    accelerate launch recipes/trl_sft/train.py CONFIG.yaml --output_dir runs/x

The YAML file has `model_name_or_path` (`demo` for the shipped model, else a Hub id or local path), `data_root`,
`tasks` (name, train_file, eval_file; image paths relative to `data_root`), `keeplora` (KeepLoRAConfig fields) and
`sft` (trl.SFTConfig fields). `--output_dir` and `--data_root` override the file.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import yaml
from peft import get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from keeplora_hf import ContinualRunner, ContinualTask, KeepLoRAConfig
from keeplora_hf.continual.evaluation import answer_exact_match
from keeplora_hf.data.collators import VLMChatCollator
from keeplora_hf.data.conversational import to_conversational
from keeplora_hf.data.formats import load_llava_json
from keeplora_hf.data.synthetic.writer import write_benchmark
from keeplora_hf.models.demo import load_demo_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the recipe's YAML file")
    parser.add_argument("--output_dir")
    parser.add_argument("--data_root")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    missing = [key for key in ("model_name_or_path", "data_root", "tasks", "keeplora", "sft") if key not in config]
    if missing:
        raise ValueError(f"{args.config}: missing {', '.join(missing)}")
    data_root = Path(args.data_root or config["data_root"])
    output_dir = args.output_dir or config["sft"].get("output_dir") or "runs/trl_sft"
    if config.get("tiny_data"):  # the demo's synthetic tasks, written as LLaVA JSON + PNG
        write_benchmark(data_root, general_size=0, general_eval_size=0, train_size=config["tiny_data"]["train_size"],
                        eval_size=config["tiny_data"]["eval_size"], tasks=[t["name"] for t in config["tasks"]])

    if config["model_name_or_path"] == "demo":
        model, processor = load_demo_model(None)
    else:
        dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
        model = AutoModelForImageTextToText.from_pretrained(config["model_name_or_path"], dtype=dtype)
        processor = AutoProcessor.from_pretrained(config["model_name_or_path"])
    peft_model = get_peft_model(model, KeepLoRAConfig(**config["keeplora"]))

    collator = VLMChatCollator(processor, max_length=config.get("max_length", 512), model_family=model.config.model_type)
    metric = answer_exact_match(collator, batch_size=16)
    tasks = [
        ContinualTask(
            task["name"],
            to_conversational(load_llava_json(data_root / task["train_file"], data_root)),
            load_llava_json(data_root / task["eval_file"], data_root),
            metric,
        )
        for task in config["tasks"]
    ]
    sft = SFTConfig(**{**config["sft"], "output_dir": output_dir})
    runner = ContinualRunner(peft_model, tasks, sft, output_dir,
                             trainer_class=functools.partial(SFTTrainer, processing_class=processor),
                             run_config={"recipe": config})
    return runner.run()


if __name__ == "__main__":
    main(sys.argv[1:])
