"""Run the toy sequence in a process of its own, optionally killing it (SIGKILL) at a chosen point.

Used by the resume, multi-process and DeepSpeed tests: `python run_toy.py OUT [--kill train|eval|save] [--task K]
[--kill-rank R] [--dtype bfloat16] [--train-lora-A]`, or under `torchrun --nproc_per_node 2` [`--deepspeed-stage 2|3`: the Trainer runs DeepSpeed ZeRO
on the CPU processes, and every rank prints `RESIDUAL <rank> <max |A P| / |A|>` at the end of each task's training].
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from keeplora_hf.continual import ContinualRunner  # noqa: E402
from keeplora_hf.sharding import full_value  # noqa: E402
from keeplora_hf import protected_basis  # noqa: E402
from keeplora_hf.tuner.layer import layer_state  # noqa: E402
from keeplora_hf.tuner.model import keeplora_layers  # noqa: E402
from toy_sequence import toy_model, toy_tasks  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringTask(TrainerCallback):
    def __init__(self, runner: ContinualRunner, task: int, step: int, rank: int | None) -> None:
        self.runner, self.task, self.step, self.rank = runner, task, step, rank

    def on_step_end(self, args, state, control, **kwargs):
        if self.runner.learned == self.task - 1 and state.global_step == self.step and self.rank in (None, args.process_index):
            die()


class PrintResidual(TrainerCallback):
    """`max |A P| / |A|` over the targets, each `A` read whole and each `P` fetched from its layer's owner (both
    collectives under ZeRO-3: every rank runs it); and how many targets' bases this rank holds."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        worst = 0.0
        for name, module in keeplora_layers(model, "default").items():
            rows = full_value(module.lora_A["default"].weight).float()
            protected = protected_basis(model, name).float()
            if rows.norm() > 0:
                worst = max(worst, float((rows @ protected).norm() / rows.norm()))
        print(f"RESIDUAL {args.process_index} {worst:.3g}", flush=True)
        states = [layer_state(module, "default") for module in keeplora_layers(model, "default").values()]
        print(f"HELD {args.process_index} {sum(s.held for s in states)} of {len(states)}", flush=True)


def deepspeed_config(stage: int, bf16: bool = False) -> dict:
    """ZeRO `stage` (in float32, or with DeepSpeed's bf16 engine, which casts the model to bfloat16), batch sizes,
    clipping and optimizer taken from the TrainingArguments, as `accelerate launch` with the recipes' DeepSpeed configs
    does (clipping left out would be DeepSpeed's default, which depends on its version). Under ZeRO-3 every parameter
    stays partitioned between uses (by default DeepSpeed keeps parameters under 1e5 elements whole on every rank: all
    of the tiny model's)."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", **({"bf16": {"enabled": "auto"}} if bf16 else {}),
            "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill", choices=["train", "eval", "save"])
    parser.add_argument("--task", type=int, default=2)
    parser.add_argument("--kill-rank", type=int, help="with --kill train: only this rank dies (default: every rank)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--deepspeed-stage", type=int, choices=[2, 3])
    parser.add_argument("--deepspeed-bf16", action="store_true", help="DeepSpeed's bf16 engine (TrainingArguments bf16)")
    parser.add_argument("--train-lora-A", action="store_true", help="train A too (re-projected after every step)")
    options = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tiny = toy_model(getattr(torch, options.dtype), train_lora_A=options.train_lora_A)
    tasks, general = toy_tasks(tiny, count=3, train_size=48)
    args = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.global_batch // world,
        num_train_epochs=10,
        learning_rate=1e-2,
        max_grad_norm=1.0,  # the clipping every mode compares against (some steps' norms exceed it)
        save_strategy="steps",
        save_steps=4,
        logging_steps=4,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
        deepspeed=deepspeed_config(options.deepspeed_stage, options.deepspeed_bf16) if options.deepspeed_stage else None,
        bf16=options.deepspeed_bf16,
    )
    callbacks = [PrintResidual()] if options.deepspeed_stage else []
    runner = ContinualRunner(model, tasks, args, options.output_dir, general_sets=general,
                             trainer_kwargs={"callbacks": callbacks})
    if options.kill == "train":
        callbacks.append(KillDuringTask(runner, options.task, step=6, rank=options.kill_rank))
    elif options.kill == "eval":
        metric = tasks[-1].metric
        calls = {"n": 0}

        def dying_metric(model, data):
            # called once per row (row 0 = before any task): die while evaluating the row after task `--task`
            calls["n"] += 1
            if calls["n"] == options.task + 1:
                die()
            return metric(model, data)

        tasks[-1].metric = dying_metric
    elif options.kill == "save":
        save = model.save_pretrained

        def dying_save(path, *a, **kw):
            save(path, *a, **kw)
            if runner.model.base_model.progress(runner.adapter).task_index == options.task:
                die()  # the adapter is written to the staging directory, but never renamed into place

        model.save_pretrained = dying_save
    results = runner.run()
    if runner.state.is_main_process:
        print("MATRIX", json.dumps(results["methods"]["keeplora++"]["accuracy_matrix"]))


if __name__ == "__main__":
    main()
