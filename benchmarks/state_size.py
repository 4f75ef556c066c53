"""Goal 4: size of the stored subspace state per layer, against min(k, d_in - k) * d_in, in memory and on disk.

A model learns `--tasks` short tasks in each configuration of CONFIGS (state dtype float32 / bfloat16, principal basis
kept or recomputed); after each task the state of every target is measured: the values it holds for the protected subspace (principal + memory, or principal +
complement), the bound, and the bytes of its tensors in memory and in the saved adapter's safetensors file.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from safetensors import safe_open

from keeplora_hf import begin_task, end_task
from measure import configure_threads, write_result
from setups import batches, keeplora, optimizer_for, train_step

BASIS_KEYS = ("keeplora_state.principal", "keeplora_state.memory", "keeplora_state.complement")


def _layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state")}


def measure(model, directory: Path) -> dict:
    model.save_pretrained(directory)
    disk = {}
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(BASIS_KEYS):
                layer = key.rsplit(".keeplora_state.", 1)[0]
                tensor = f.get_tensor(key)
                disk[layer] = disk.get(layer, 0) + tensor.numel() * tensor.element_size()
    rows = []
    for name, module in _layers(model).items():
        state = module.keeplora_state["default"]
        d, p, m = state.d_in, state.principal_rank, state.memory_rank
        k = p + m
        tensors = [t for t in (state.stored_principal, state._memory, state.complement) if t is not None]
        bases = sum(t.numel() for t in tensors)  # the principal energies (p scalars, when kept alone) are not bases
        rows.append(
            {
                "layer": name,
                "d_in": d,
                "p": p,
                "m": m,
                "stored_as": "complement" if state.complement is not None else "memory",
                "values": bases,
                "scalars": state.stored_values() - bases,
                "bound_min_k": min(k, d - k) * d,
                "bound_with_principal": (p + min(m, d - k)) * d,
                "full_basis_values": k * d,
                "memory_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "disk_bytes": disk.get(name, 0),
                "dtype": str(tensors[0].dtype) if tensors else None,
            }
        )
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    return {
        "layers": rows,
        "total_values": total("values"),
        "total_bound_min_k": total("bound_min_k"),
        "total_bound_with_principal": total("bound_with_principal"),
        "total_full_basis_values": total("full_basis_values"),
        "total_memory_bytes": total("memory_bytes"),
        "total_disk_bytes": total("disk_bytes"),
        "layers_within_min_k_bound": sum(r["values"] <= r["bound_min_k"] for r in rows),
        "layers_within_bound_with_principal": sum(r["values"] <= r["bound_with_principal"] for r in rows),
        "layers_stored_as_complement": sum(r["stored_as"] == "complement" for r in rows),
        "layer_count": len(rows),
    }


CONFIGS = {  # keep_principal_basis=False is the default; named explicitly so the labels hold whatever it is
    "float32, keep_principal_basis=True": {"keep_principal_basis": True},
    "float32, keep_principal_basis=False": {"keep_principal_basis": False},
    "bfloat16, keep_principal_basis=True": {"state_dtype": "bfloat16", "keep_principal_basis": True},
    "bfloat16, keep_principal_basis=False": {"state_dtype": "bfloat16", "keep_principal_basis": False},
}


def run(model_name: str, tasks: int, steps: int) -> dict:
    out = {}
    for dtype, overrides in CONFIGS.items():
        model, bench = keeplora(model_name, **overrides)
        per_task = []
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            for task in range(tasks):
                data = batches(bench, steps, offset=1000 * task)
                begin_task(model, data, max_batches=1)
                optimizer = optimizer_for(model)
                for batch in data:
                    train_step(model, batch, optimizer)
                end_task(model, data, max_batches=1)
                summary = measure(model, Path(tmp) / f"{len(per_task)}-{len(out)}")
                summary["task"] = task
                per_task.append(summary)
                print(dtype, task, {k: v for k, v in summary.items() if k != "layers"}, flush=True)
        out[dtype] = per_task
    return {"model": bench.description, "tasks": tasks, "configs": CONFIGS, "by_config": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    configure_threads(args.model)
    print(write_result(f"state_size_{args.model}", run(args.model, args.tasks, args.steps)))


if __name__ == "__main__":
    main()
