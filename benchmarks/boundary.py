"""Goal 2: task-boundary time (begin_task + end_task) over one training epoch of the same task.

For each configuration a fresh model learns `--tasks` tasks of `--epoch` batches each, at gradient_data_ratio=0.2
(the statistics passes see ceil(0.2 * epoch) batches). Configurations are interleaved task by task (A's task 1, B's
task 1, A's task 2, ...), and within a task the order is begin, epoch, end, so every ratio compares times taken
minutes apart at most. The first task includes the principal-subspace extraction, done once per sequence; later tasks
show the per-task cost. Each boundary is broken down by phase (principal bases, gradient pass, A from the gradient,
feature pass, memory update) by timing the library's own functions, which is also the profile the optimisations
were chosen from.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections import defaultdict

import torch

import keeplora_hf.tuner.feature_memory as feature_memory
import keeplora_hf.tuner.lifecycle as lifecycle
from keeplora_hf import begin_task, end_task
from measure import configure_threads, timed, write_result
from setups import batches, bench_model, keeplora, optimizer_for, train_step

CONFIGS = {
    "fast": {},  # the defaults: sketch, gram, randomized, float32 state
    "exact": {"gradient_estimator": "exact", "principal_solver": "svd", "memory_solver": "eigh"},
}
PHASES = {
    "principal_basis": "principal bases",
    "output_gradient_pass": "gradient pass",
    "weight_gradient_pass": "gradient pass",
    "residual_directions": "A from the gradient (exact SVD)",
    "input_feature_pass": "feature pass",
    "grow_memory": "memory update",
}


class PhaseClock:
    """Wraps the lifecycle's building blocks to add up the seconds spent in each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._originals = {}

    def __enter__(self):
        # end_task's feature pass runs in feature_memory, the rest in lifecycle: wrap each name where it is called
        for module, name, label in [(m, n, label) for m in (lifecycle, feature_memory) for n, label in PHASES.items()]:
            if not hasattr(module, name):
                continue
            original = getattr(module, name)
            self._originals[module, name] = original

            @functools.wraps(original)
            def wrapper(*args, __original=original, __label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return __original(*args, **kwargs)
                finally:
                    self.seconds[__label] += time.perf_counter() - start

            setattr(module, name, wrapper)
        return self

    def __exit__(self, *exc):
        for (module, name), original in self._originals.items():
            setattr(module, name, original)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def run(model_name: str, epoch: int, tasks: int, configs: list[str]) -> dict:
    bench = bench_model(model_name)
    models = {c: keeplora(model_name, gradient_data_ratio=0.2, **CONFIGS[c])[0] for c in configs}
    records: dict[str, list[dict]] = {c: [] for c in configs}
    clock = PhaseClock()
    with clock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in range(tasks):
            data = batches(bench, epoch, offset=1000 * task)
            for config in configs:
                model = models[config]
                clock.take()
                begin = timed(lambda: begin_task(model, data))
                begin_phases = clock.take()
                optimizer = optimizer_for(model)
                losses = []
                train = timed(lambda: [losses.append(train_step(model, b, optimizer)) for b in data])
                end = timed(lambda: end_task(model, data))
                end_phases = clock.take()
                records[config].append(
                    {
                        "task": task,
                        "begin_task_s": begin,
                        "end_task_s": end,
                        "epoch_s": train,
                        "boundary_over_epoch": (begin + end) / train,
                        "begin_phases_s": begin_phases,
                        "end_phases_s": end_phases,
                        "first_loss": losses[0],
                        "last_loss": losses[-1],
                    }
                )
                print(config, records[config][-1], flush=True)
    summary = {}
    for config, rows in records.items():
        later = [r["boundary_over_epoch"] for r in rows[1:]]
        summary[config] = {
            "first_task_boundary_over_epoch": rows[0]["boundary_over_epoch"],
            "later_tasks_boundary_over_epoch_median": statistics.median(later) if later else None,
            "first_task_without_principal_over_epoch": (
                rows[0]["begin_task_s"] + rows[0]["end_task_s"] - rows[0]["begin_phases_s"].get("principal bases", 0.0)
            ) / rows[0]["epoch_s"],
        }
    return {
        "model": bench.description,
        "epoch_batches": epoch,
        "statistics_batches": -(-epoch // 5),
        "tasks": tasks,
        "configs": {c: CONFIGS[c] for c in configs},
        "records": records,
        "summary": summary,
        "goal": {"boundary_over_epoch": 0.25},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--epoch", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    configure_threads(args.model)
    torch.manual_seed(0)
    result = run(args.model, args.epoch, args.tasks, args.configs)
    print(write_result(f"boundary_{args.model}", result))


if __name__ == "__main__":
    main()
