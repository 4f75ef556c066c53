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
- `end_task` / `end_task_exact`: end_task (feature statistics, memory update, merge) in the fast / exact config;
- `end_task_later`: a second task's end_task (the state of one finished task: its complement-stored targets gather
  their statistics in the complement's coordinates).

The measure a GPU sees is `peak RSS - bare`, with `bare` the resident memory of a fresh interpreter that has imported
torch and nothing else (`--scenario bare`): a GPU holds no interpreter, but the libraries transformers and peft load
count on both sides. `--feature-source`, `--rank` and `--text-tokens` set the workload (the issue's: r 16, 4 x 80
tokens on `llava-7bp-bf16`, with the default `activations` and with `mean_gradient`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch

from measure import configure_threads, isolated, peak_memory, write_result

SCENARIOS = (
    "bare",
    "lora_step",
    "keeplora_step",
    "begin_task_first",
    "begin_task_first_exact",
    "begin_task_later",
    "end_task",
    "end_task_exact",
    "end_task_later",
)
EXACT = {"gradient_estimator": "exact", "principal_solver": "svd", "memory_solver": "eigh"}


def scenario(name: str, model_name: str, statistics_batches: int, batch_size: int | None = None,
             workload: dict | None = None) -> dict:
    if name == "bare":
        return {"scenario": name, "bare_mib": _rss_mib()}
    from keeplora_hf import begin_task, end_task
    from setups import batches, bench_model, keeplora, lora, optimizer_for, train_step

    warnings.simplefilter("ignore")
    import gc

    gc.collect()
    baseline = _rss_mib()  # the interpreter and its libraries, before any model exists
    workload = workload or {}
    bench = bench_model(model_name, text_tokens=workload.get("text_tokens"))
    if batch_size:
        bench.batch_size = batch_size
    data = batches(bench, max(2, statistics_batches))
    stats = data[:statistics_batches]
    weights_mib = sum(p.numel() * p.element_size() for p in bench.model.parameters()) / 2**20
    if name == "lora_step":
        model, _ = lora(model_name, rank=workload.get("rank"), text_tokens=workload.get("text_tokens"))
        optimizer = optimizer_for(model)
        train_step(model, data[0], optimizer)
        result = peak_memory(lambda: train_step(model, data[1], optimizer))
    else:
        config = dict(EXACT) if name.endswith("_exact") else {}
        if workload.get("feature_source"):
            config["feature_source"] = workload["feature_source"]
        model, _ = keeplora(model_name, rank=workload.get("rank"), text_tokens=workload.get("text_tokens"), **config)
        if name == "keeplora_step":
            begin_task(model, stats)
            optimizer = optimizer_for(model)
            train_step(model, data[0], optimizer)
            result = peak_memory(lambda: train_step(model, data[1], optimizer))
        else:

            def task_trained() -> None:  # a task begun and trained one step, its optimizer dropped
                begin_task(model, stats)
                train_step(model, data[0], optimizer_for(model))

            if name in ("begin_task_later", "end_task", "end_task_exact", "end_task_later"):
                task_trained()
            if name in ("begin_task_later", "end_task_later"):
                end_task(model, stats)
            if name == "end_task_later":
                task_trained()
            with torch.no_grad():
                model(**data[0])
            operation = end_task if name.startswith("end_task") else begin_task
            result = peak_memory(lambda: operation(model, stats))
    return {"scenario": name, "weights_mib": weights_mib, "interpreter_mib": baseline, **result}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run(model_name: str, repeats: int, statistics_batches: int, scenarios: list[str], batch_size: int | None,
        workload: dict) -> dict:
    samples: dict[str, list[dict]] = {s: [] for s in ("bare", *scenarios)}
    extra = ["--batch-size", str(batch_size)] if batch_size else []
    for flag, key in (("--rank", "rank"), ("--text-tokens", "text_tokens"), ("--feature-source", "feature_source")):
        if workload.get(key) is not None:
            extra += [flag, str(workload[key])]
    for _ in range(repeats):
        for name in samples:
            row = isolated(
                "memory.py", "--scenario", name, "--model", model_name, "--batches", str(statistics_batches), *extra
            )
            samples[name].append(row)
            print(row, flush=True)
    bare = statistics.median(r["bare_mib"] for r in samples.pop("bare"))
    peaks = {name: statistics.median(r["peak_mib"] for r in rows) for name, rows in samples.items()}
    increases = {name: statistics.median(r["increase_mib"] for r in rows) for name, rows in samples.items()}
    # as a GPU sees it: over a bare interpreter with torch imported (the measure of the goal)
    over_bare = {name: peak - bare for name, peak in peaks.items()}
    # over everything imported before the model was built (torch, transformers, peft, keeplora_hf)
    own = {name: statistics.median(r["peak_mib"] - r["interpreter_mib"] for r in rows) for name, rows in samples.items()}
    ratios, over_bare_ratios, own_ratios, increase_ratios = {}, {}, {}, {}
    for name in samples:
        if name != "lora_step" and "lora_step" in peaks:
            ratios[f"{name}_over_lora_step"] = peaks[name] / peaks["lora_step"]
            increase_ratios[f"{name}_over_lora_step"] = increases[name] / increases["lora_step"]
            over_bare_ratios[f"{name}_over_lora_step"] = over_bare[name] / over_bare["lora_step"]
            own_ratios[f"{name}_over_lora_step"] = own[name] / own["lora_step"]
    return {
        "model": model_name,
        "batch_size": batch_size or "default",
        "workload": workload,
        "statistics_batches": statistics_batches,
        "repeats": repeats,
        "bare_interpreter_with_torch_mib": bare,
        "samples": samples,
        "peak_mib_median": peaks,
        "increase_mib_median": increases,
        "peak_over_bare_mib_median": over_bare,
        "peak_without_interpreter_mib_median": own,
        "ratios": ratios,
        "ratios_over_bare": over_bare_ratios,
        "ratios_without_interpreter": own_ratios,
        # the operation's own high point over what was resident before it (weights, state, optimizer): the strictest
        "ratios_of_increase": increase_ratios,
        "goal": {"begin_task_over_lora_step": 1.25, "end_task_over_lora_step": 1.25, "measure": "ratios_over_bare"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="batches in each statistics pass")
    parser.add_argument("--batch-size", type=int, default=None, help="override the model's benchmark batch size")
    parser.add_argument("--scenario", choices=SCENARIOS, help="run one scenario in this process and print JSON")
    parser.add_argument("--scenarios", nargs="+", default=[s for s in SCENARIOS if s != "bare"])
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the model's, setups.RANK)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens per sequence (LLaVA models)")
    parser.add_argument("--feature-source", choices=["activations", "mean_gradient", "gradients"], default=None)
    parser.add_argument("--name", default=None, help="results/memory_<name>.json (default: the model and batch size)")
    args = parser.parse_args()
    workload = {"rank": args.rank, "text_tokens": args.text_tokens, "feature_source": args.feature_source}
    if args.scenario:
        if args.scenario != "bare":
            configure_threads(args.model)
        print(json.dumps(scenario(args.scenario, args.model, args.batches, args.batch_size, workload)))
        return
    configure_threads(args.model)
    result = run(args.model, args.repeats, args.batches, args.scenarios, args.batch_size, workload)
    suffix = f"_batch{args.batch_size}" if args.batch_size else ""
    if args.name:
        suffix = f"_{args.name}"
    print(write_result(f"memory_{args.model}{suffix}", result))


if __name__ == "__main__":
    main()
