"""Goal 3: peak memory of begin_task over the peak memory of a LoRA training step, same model and batch.

Every scenario runs in a fresh interpreter (`--scenario NAME`), and the scenarios are run round-robin `--repeats`
times; the method (RSS high-water mark after `malloc_trim` and a reset of `VmHWM`) is described in measure.py. Each
scenario first builds the model and its data, runs one untimed warm-up (a training step for the step scenarios, which
also allocates AdamW's state; a no-grad forward otherwise, which sizes the allocator's and oneDNN's caches), and then
measures the one operation:

- `lora_step` / `keeplora_step`: a training step of PEFT LoRA / KeepLoRA++ (frozen A) of the same rank and targets;
- `begin_task_first`: KeepLoRA++'s first begin_task (principal bases + gradient estimate), default (sketch) config;
- `begin_task_first_exact`: the same with `gradient_estimator="exact"` (full gradients of all targets held at once);
- `begin_task_later`: a second task's begin_task (no principal extraction; the state of one finished task);
- `end_task` / `end_task_exact`: end_task (feature statistics, memory update, merge) in the fast / exact config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch

from measure import configure_threads, isolated, peak_memory, write_result

SCENARIOS = (
    "lora_step",
    "keeplora_step",
    "begin_task_first",
    "begin_task_first_exact",
    "begin_task_later",
    "end_task",
    "end_task_exact",
)
EXACT = {"gradient_estimator": "exact", "principal_solver": "svd", "memory_solver": "eigh"}


def scenario(name: str, model_name: str, statistics_batches: int, batch_size: int | None = None) -> dict:
    from keeplora_hf import begin_task, end_task
    from setups import batches, bench_model, keeplora, lora, optimizer_for, train_step

    warnings.simplefilter("ignore")
    import gc

    gc.collect()
    baseline = _rss_mib()  # the interpreter and its libraries, before any model exists
    bench = bench_model(model_name)
    if batch_size:
        bench.batch_size = batch_size
    data = batches(bench, max(2, statistics_batches))
    stats = data[:statistics_batches]
    weights_mib = sum(p.numel() * p.element_size() for p in bench.model.parameters()) / 2**20
    if name == "lora_step":
        model, _ = lora(model_name)
        optimizer = optimizer_for(model)
        train_step(model, data[0], optimizer)
        result = peak_memory(lambda: train_step(model, data[1], optimizer))
    else:
        config = EXACT if name.endswith("_exact") else {}
        model, _ = keeplora(model_name, **config)
        if name == "keeplora_step":
            begin_task(model, stats)
            optimizer = optimizer_for(model)
            train_step(model, data[0], optimizer)
            result = peak_memory(lambda: train_step(model, data[1], optimizer))
        else:
            if name in ("begin_task_later", "end_task", "end_task_exact"):
                begin_task(model, stats)
                optimizer = optimizer_for(model)
                train_step(model, data[0], optimizer)
                del optimizer
            if name == "begin_task_later":
                end_task(model, stats)
            with torch.no_grad():
                model(**data[0])
            operation = end_task if name.startswith("end_task") else begin_task
            result = peak_memory(lambda: operation(model, stats))
    return {"scenario": name, "weights_mib": weights_mib, "interpreter_mib": baseline, **result}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run(model_name: str, repeats: int, statistics_batches: int, scenarios: list[str], batch_size: int | None) -> dict:
    samples: dict[str, list[dict]] = {s: [] for s in scenarios}
    extra = ["--batch-size", str(batch_size)] if batch_size else []
    for _ in range(repeats):
        for name in scenarios:
            row = isolated(
                "memory.py", "--scenario", name, "--model", model_name, "--batches", str(statistics_batches), *extra
            )
            samples[name].append(row)
            print(row, flush=True)
    peaks = {name: statistics.median(r["peak_mib"] for r in rows) for name, rows in samples.items()}
    increases = {name: statistics.median(r["increase_mib"] for r in rows) for name, rows in samples.items()}
    # the same peaks without the interpreter and its libraries (~1 GiB of torch + transformers, the same everywhere)
    own = {name: statistics.median(r["peak_mib"] - r["interpreter_mib"] for r in rows) for name, rows in samples.items()}
    ratios, own_ratios = {}, {}
    for name in scenarios:
        if name != "lora_step" and "lora_step" in peaks:
            ratios[f"{name}_over_lora_step"] = peaks[name] / peaks["lora_step"]
            own_ratios[f"{name}_over_lora_step"] = own[name] / own["lora_step"]
    return {
        "model": model_name,
        "batch_size": batch_size or "default",
        "statistics_batches": statistics_batches,
        "repeats": repeats,
        "samples": samples,
        "peak_mib_median": peaks,
        "increase_mib_median": increases,
        "peak_without_interpreter_mib_median": own,
        "ratios": ratios,
        "ratios_without_interpreter": own_ratios,
        "goal": {"begin_task_first_over_lora_step": 1.25},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="batches in each statistics pass")
    parser.add_argument("--batch-size", type=int, default=None, help="override the model's benchmark batch size")
    parser.add_argument("--scenario", choices=SCENARIOS, help="run one scenario in this process and print JSON")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    args = parser.parse_args()
    configure_threads(args.model)
    if args.scenario:
        print(json.dumps(scenario(args.scenario, args.model, args.batches, args.batch_size)))
        return
    result = run(args.model, args.repeats, args.batches, args.scenarios, args.batch_size)
    suffix = f"_batch{args.batch_size}" if args.batch_size else ""
    print(write_result(f"memory_{args.model}{suffix}", result))


if __name__ == "__main__":
    main()
