"""Run the toy sequence in a process of its own, optionally killing it (SIGKILL) at a chosen point.

Used by the resume and multi-process tests: `python run_toy.py OUT [--kill train|eval|save] [--task K]`, or under
`torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from keeplora_hf.continual import ContinualRunner  # noqa: E402
from toy_sequence import toy_model, toy_tasks  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringTask(TrainerCallback):
    def __init__(self, runner: ContinualRunner, task: int, step: int) -> None:
        self.runner, self.task, self.step = runner, task, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.runner.learned == self.task - 1 and state.global_step == self.step:
            die()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill", choices=["train", "eval", "save"])
    parser.add_argument("--task", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    options = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tiny = toy_model()
    tasks, general = toy_tasks(tiny, count=3, train_size=48)
    args = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.global_batch // world,
        num_train_epochs=10,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        logging_steps=4,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    callbacks = []
    runner = ContinualRunner(model, tasks, args, options.output_dir, general_sets=general,
                             trainer_kwargs={"callbacks": callbacks})
    if options.kill == "train":
        callbacks.append(KillDuringTask(runner, options.task, step=6))
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
