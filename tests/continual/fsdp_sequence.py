"""The toy sequence on the tiny LLaVA with the base sharded by FSDP2 (`fully_shard`), in a training loop of its own.

`python fsdp_sequence.py OUT` runs it in one process (unsharded; `--micro-batches 2` accumulates each batch in the two
halves two ranks would take, the same computation up to the order of the gradient sums); under `torchrun --nproc_per_node 2` every decoder
layer and the whole model are sharded with `fully_shard` (gloo, CPU). Each rank takes its half of every global batch
of 8. A task's adapter (with the KeepLoRA state) and its accuracy row are saved in `OUT/task_<t>/` once the task has
ended; a rerun loads the last saved task before sharding (as a user loads an adapter) and goes on from there.
`--kill-rank R --kill-task T` makes rank R SIGKILL itself in the middle of task T's training.

Prints `MATRIX <json>` (rank 0), and on every rank at the end of every task's training `RESIDUAL <rank> <max |A P| / |A|>`
and `HELD <rank> <json list of the targets whose bases it holds>`; writes
each target's learned update to `OUT/updates.safetensors` (rank 0); sharded, rank 0 also tries `export_lora` on the
live model and prints `EXPORT_REFUSED` with the error it must raise.
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
import torch.distributed as dist  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import keeplora_hf  # noqa: E402
from keeplora_hf import export_lora, protected_basis  # noqa: E402
from keeplora_hf.continual.evaluation import answer_exact_match  # noqa: E402
from keeplora_hf.tuner.lifecycle import learned_update  # noqa: E402
from keeplora_hf.models import build_tiny  # noqa: E402
from keeplora_hf.sharding import local_value  # noqa: E402
from keeplora_hf.tuner.layer import layer_state  # noqa: E402
from keeplora_hf.tuner.model import keeplora_layers  # noqa: E402
from toy_sequence import toy_model, toy_tasks  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 12
SHARDED_LAYERS = ("LlamaDecoderLayer", "CLIPEncoderLayer")


def batches(rows: list, rank: int, world: int, *, seed: int, dtype: torch.dtype) -> list[dict]:
    """Global batches of 8 in a fixed shuffled order, this rank's share of each (rows `rank::world`), pixels in the
    model's dtype."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks = [order[i : i + GLOBAL_BATCH] for i in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH)]
    collated = [default_collate([rows[i] for i in chunk[rank::world]]) for chunk in chunks]
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()} for batch in collated]


def shard(model: torch.nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ in SHARDED_LAYERS:
            fully_shard(module)
    fully_shard(model)


def residual_leak(model: torch.nn.Module) -> float:
    """Largest `|A P| / |A|` over the targets, from the rows of `A` this rank holds (`P` from the layer's owner: every
    rank fetches every basis)."""
    worst = 0.0
    for name, module in keeplora_layers(model, "default").items():
        protected = protected_basis(model, name).float()
        rows = local_value(module.lora_A["default"].weight.detach()).float()
        if rows.numel() and rows.norm() > 0:
            worst = max(worst, float((rows @ protected).norm() / rows.norm()))
    return worst


def held_bases(model: torch.nn.Module) -> list[str]:
    """The targets whose protected bases this rank holds (all of them in one process; its share when sharded)."""
    return [name for name, module in keeplora_layers(model, "default").items() if layer_state(module, "default").held]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-task", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--micro-batches", type=int, default=1, help="one process: split each batch as N ranks would")
    parser.add_argument("--train-lora-A", action="store_true", help="train A too, re-projected after every step")
    options = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    dtype = getattr(torch, options.dtype)
    model, tiny = toy_model(dtype, train_lora_A=options.train_lora_A)
    tasks, _ = toy_tasks(tiny, count=2, train_size=32)
    done = sorted(options.out.glob("task_*/row.json"))
    if done:  # resume: the adapter of the last finished task, loaded into a fresh base before sharding
        base = build_tiny("llava").model.to(dtype)
        model = PeftModel.from_pretrained(base, str(done[-1].parent / "adapter"), is_trainable=True)
    rows = [json.loads(path.read_text()) for path in done]
    if world > 1:
        shard(model)

    metric = answer_exact_match(batch_size=16)
    for index in range(len(done), len(tasks)):
        task = tasks[index]
        if world > 1:
            steps = [[batch] for batch in batches(task.train_dataset, rank, world, seed=index, dtype=dtype)]
        else:  # the same rows, in the same micro-batches as `--micro-batches` ranks would take them
            shares = [batches(task.train_dataset, j, options.micro_batches, seed=index, dtype=dtype) for j in range(options.micro_batches)]
            steps = [list(parts) for parts in zip(*shares)]
        data = [part for parts in steps for part in parts]
        keeplora_hf.begin_task(model, data)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        keeplora_hf.attach_residual_projection(optimizer, model)  # a no-op unless A trains
        for step in range(STEPS):
            if index == options.kill_task and rank == options.kill_rank and step == STEPS // 2:
                os.kill(os.getpid(), signal.SIGKILL)
            for part in steps[step % len(steps)]:
                (model(**part).loss / len(steps[0])).backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"RESIDUAL {rank} {residual_leak(model):.3g}", flush=True)
        print(f"HELD {rank} {json.dumps(held_bases(model))}", flush=True)
        keeplora_hf.end_task(model, data)
        rows.append([metric(model, t.eval_dataset) for t in tasks])
        staging = options.out / f".staging_{index}"
        model.save_pretrained(str(staging / "adapter"), is_main_process=rank == 0)  # every rank: the gathers
        if rank == 0:
            (staging / "row.json").write_text(json.dumps(rows[-1]))
            os.replace(staging, options.out / f"task_{index}")
        if world > 1:
            dist.barrier()

    updates = {name: learned_update(model, name).contiguous() for name in keeplora_layers(model, "default")}
    if rank == 0:
        save_file(updates, str(options.out / "updates.safetensors"))
        print("MATRIX " + json.dumps(rows), flush=True)
        if world > 1:  # the live adapter is sharded: exporting it on one rank is refused, not a hang
            try:
                export_lora(model, options.out / "export")
            except ValueError as error:
                print(f"EXPORT_REFUSED {error}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
