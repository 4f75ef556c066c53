"""Per-rank peak memory of a KeepLoRA++ task under FSDP2 (2 CPU ranks, `fully_shard`) over one unsharded process.

    python benchmarks/fsdp2_memory.py [--model llava-1b-f32]

Both runs build the same model and the same global batches (each rank takes its half of every batch), shard the
decoder and vision layers and the whole model with `fully_shard` when there are two ranks, and then measure, as
measure.py does (RSS high-water mark after `malloc_trim` and a reset of `VmHWM`), each phase of one whole task:
`begin_task`, four AdamW steps, `end_task`, saving the adapter (every rank calls `save_pretrained`, rank 0 writes),
and the next task's `begin_task`. KeepLoRA++ runs with the `keeplora` section of the UCIT LLaVA-1.5-7B recipe
(`feature_source: mean_gradient`, energies 0.6 / 0.99); PEFT LoRA of the same rank and targets, its training steps
only, is the baseline for what FSDP2 itself costs. Reported per rank: the peak, the resident memory after the imports (the interpreter, before
any model is built) and before the task, the weights and the KeepLoRA bases it holds (under FSDP2 the state is
sharded by layer: each rank holds its layers' bases), and two ratios of the largest per-rank peak to the single
process's: of the whole RSS, and of what lies above the interpreter (what scales with the model: on a GPU, its
memory holds only that).

Every run, single or sharded, LoRA or KeepLoRA++, has glibc return each block of 1 MiB or more to the system when it
is freed (`MALLOC_MMAP_THRESHOLD_`), so the RSS peak counts memory in use. By default glibc raises that threshold as
large blocks are freed and keeps them in its heap, which made a process's peak grow with every layer FSDP2 gathers
(measured: LoRA's training peak 4 GB above its start on each rank, 1.8 GB in one process); a GPU's caching allocator
reuses such blocks. `--glibc-default` measures with glibc's default instead (`..._glibc.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import yaml

from measure import REPO, isolated, peak_memory, resident_mib, write_result

SHARDED_LAYERS = ("LlamaDecoderLayer", "CLIPEncoderLayer")
GLOBAL_BATCH = 2
STEPS = 4
RETURNED_BLOCK = 1 << 20
RECIPE = REPO / "recipes" / "llava_vqa" / "config_ucit_llava15_7b.yaml"
# the benchmark model's own names, rank and dropout (as its LoRA baseline's) replace the recipe's
MODEL_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules")


def recipe_settings() -> dict:
    """The recipe's KeepLoRAConfig fields that do not depend on the model."""
    section = yaml.safe_load(RECIPE.read_text())["keeplora"]
    return {k: v for k, v in section.items() if k not in MODEL_FIELDS}


def _mib(tensors) -> float:
    from keeplora_hf.sharding import local_value

    return sum(local_value(t).numel() * t.element_size() for t in tensors if not t.is_meta) / 2**20


def worker(model_name: str, method: str) -> dict:
    """One rank's measurement (or the single process's); printed as JSON by rank 0 for all ranks."""
    from torch.distributed.fsdp import fully_shard

    from keeplora_hf import begin_task, end_task
    from setups import keeplora, lora, optimizer_for, train_step

    warnings.simplefilter("ignore")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    interpreter = resident_mib()
    model, bench = keeplora(model_name, **recipe_settings()) if method == "keeplora" else lora(model_name)
    rows = [bench.make_batch(GLOBAL_BATCH, seed) for seed in range(STEPS)]
    data = [{k: v[rank::world] if torch.is_tensor(v) and v.shape[:1] == (GLOBAL_BATCH,) else v for k, v in batch.items()}
            for batch in rows]
    if world > 1:
        for module in model.modules():
            if type(module).__name__ in SHARDED_LAYERS:
                fully_shard(module)
        fully_shard(model)

    optimizer = []

    def train() -> None:
        optimizer.append(optimizer_for(model))
        for batch in data:
            train_step(model, batch, optimizer[0])

    def save() -> None:
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory, is_main_process=rank == 0)

    phases = {
        "begin_task": lambda: begin_task(model, data),
        "train": train,
        "end_task": lambda: end_task(model, data),
        "save": save,
        "next_begin_task": lambda: begin_task(model, data),
    } if method == "keeplora" else {"train": train}
    measured = {name: peak_memory(phase) for name, phase in phases.items()}
    worst = max(measured.values(), key=lambda m: m["peak_mib"])
    state = [b for name, b in model.named_buffers() if "keeplora_state" in name]
    result = {**worst, "interpreter_mib": interpreter, "phases": {name: m["peak_mib"] for name, m in measured.items()},
              "weights_mib": _mib(model.parameters()), "state_mib": _mib(state)}
    results = [result]
    if world > 1:
        results = [None] * world
        dist.all_gather_object(results, result)
        dist.destroy_process_group()
    return {"ranks": results}


def measure(model_name: str, method: str) -> dict:
    """The single process and the two FSDP2 ranks, each in fresh interpreters."""
    single = isolated("fsdp2_memory.py", "--worker", "--model", model_name, "--method", method)["ranks"][0]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--worker",
               "--model", model_name, "--method", method]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-4000:]}")
    sharded = json.loads(run.stdout.strip().splitlines()[-1])["ranks"]
    above = max(rank["peak_mib"] - rank["interpreter_mib"] for rank in sharded)
    return {
        "single_process": single,
        "fsdp2_two_ranks": sharded,
        "peak_ratio": max(rank["peak_mib"] for rank in sharded) / single["peak_mib"],
        "above_interpreter_ratio": above / (single["peak_mib"] - single["interpreter_mib"]),
        "phase_ratios": {phase: max(rank["phases"][phase] for rank in sharded) / peak
                         for phase, peak in single["phases"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-1b-f32")
    parser.add_argument("--worker", action="store_true", help="internal: measure in this process (or rank)")
    parser.add_argument("--method", default="keeplora", choices=["keeplora", "lora"], help="internal, with --worker")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's own mmap threshold (see above)")
    args = parser.parse_args()
    if args.worker:
        result = worker(args.model, args.method)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return

    allocator = "glibc default" if args.glibc_default else f"blocks >= {RETURNED_BLOCK} B returned at free"
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(RETURNED_BLOCK)  # inherited by every measured process
    methods = {method: measure(args.model, method) for method in ("lora", "keeplora")}
    name = f"fsdp2_memory_{args.model}{'_glibc' if args.glibc_default else ''}"
    path = write_result(name, {"model": args.model, "global_batch": GLOBAL_BATCH, "allocator": allocator,
                               "keeplora_settings": recipe_settings(), **methods})
    print("| method | run | peak MiB | interpreter | before the task | weights held | KeepLoRA bases held | per-phase peaks |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for method, result in methods.items():
        runs = [("one process", result["single_process"])]
        runs += [(f"FSDP2 rank {i}", r) for i, r in enumerate(result["fsdp2_two_ranks"])]
        for label, r in runs:
            phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items())
            print(f"| {method} | {label} | {r['peak_mib']:.0f} | {r['interpreter_mib']:.0f} | {r['rss_before_mib']:.0f} "
                  f"| {r['weights_mib']:.0f} | {r['state_mib']:.0f} | {phases} |")
    for method, result in methods.items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in result["phase_ratios"].items())
        print(f"{method}: largest per-rank peak / single-process peak {result['peak_ratio']:.2f}; above the "
              f"interpreter {result['above_interpreter_ratio']:.2f}; per phase: {phases}")
    print(path)


if __name__ == "__main__":
    main()
