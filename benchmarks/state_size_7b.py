"""Goal 3: the KeepLoRA++ state and the saved adapter of LLaVA-1.5-7B after 1, 4 and 8 tasks, from its shapes and
ranks measured on a pre-trained model.

The size of a layer's state is fixed by its shapes and two ranks: `p`, the principal rank at `principal_energy`
(epsilon_w = 0.6), and `m`, the feature memory after T tasks at `feature_energy` (epsilon_f = 0.99). Random weights
have flat spectra (a square Gaussian matrix needs p/d_in = 0.24 for 60% of its energy, the synthetic spectra of
`principal.py` 0.19-0.26; the pre-trained demo's q and k need 0.04), so the ranks are measured instead on the most
realistic model this machine trains: the shipped pre-trained demo VLM (`keeplora_hf/assets/demo_vlm`, Llama decoder 4 x 128, MLP 512), wrapped for KeepLoRA++ as
`keeplora-hf demo` wraps it and taken through 8 tasks of the demo data (`demo_sequence.py`). After each task every
target's `p` and `m` are read from its state, and the adapter is saved and its file measured.

Applied to the 7B: for each decoder target type (q, k, v, o, gate, up, down) and demo decoder layer `j`, the fractions
`p / d_in` and `m_T / d_in` (cumulative memory after T tasks) are measured; 7B decoder layer `i` of 32 takes those of
demo layer `j = floor(4 i / 32)` (the depth profile is kept), times the 7B's `d_in` (4096, or 11008 for down), rounded.
The vision targets of the demo are measured and reported but not applied (LLaVA-1.5 recipes train the decoder only).

Sizes follow the library's layout rules (`KeepLoRALayerState`, default `keep_principal_basis=False`): a layer stores
`principal` (d_in x p) and `memory` (d_in x m) in `state_dtype` while `k = p + m <= d_in - k`, else only the complement
(d_in x (d_in - k)) and the p principal energies (float64); plus the weight fingerprint (d_out x 2, float32) and
finished tasks in float32 (r x d_in and d_out x r each). The saved adapter adds the live LoRA factors (float32), the
per-task scalings, counters, checksum and the safetensors header. The same formula is checked against the demo's
saved files (`formula_check`).

    python benchmarks/state_size_7b.py                    # ~5 min: results/state_size_llava-1.5-7b.json + table
    python benchmarks/state_size_7b.py --steps 10 --tasks 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch

from demo_sequence import SEQUENCE, demo_keeplora, run_task, task_datasets
from measure import configure_threads, write_result

LAYERS_7B, RANK_7B = 32, 32  # LLaVA-1.5-7B decoder; UCIT's r = 32
HIDDEN_7B, MLP_7B = 4096, 11008
SHAPES_7B = {  # (d_in, d_out) of each decoder target
    "q_proj": (HIDDEN_7B, HIDDEN_7B), "k_proj": (HIDDEN_7B, HIDDEN_7B), "v_proj": (HIDDEN_7B, HIDDEN_7B),
    "o_proj": (HIDDEN_7B, HIDDEN_7B), "gate_proj": (HIDDEN_7B, MLP_7B), "up_proj": (HIDDEN_7B, MLP_7B),
    "down_proj": (MLP_7B, HIDDEN_7B),
}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CHECKPOINTS = (1, 4, 8)
STATE_DTYPES = {"float32": 4, "bfloat16": 2}
SAFETENSORS_DTYPE = {4: "F32", 2: "BF16", 8: "F64"}
GB = 1e9
_LANGUAGE = re.compile(r"language_model\.layers\.(\d+)\.\w+\.(\w+)$")
_VISION = re.compile(r"vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.\w+\.(\w+)$")


# -- the size of a state, from shapes and ranks -------------------------------------------------------------------


def layer_tensors(name: str, d_in: int, d_out: int, p: int, m: int, r: int, tasks: int, basis_bytes: int,
                  *, keep_principal: bool = False) -> list[tuple[str, int, int, str]]:
    """(key, element bytes, element count, part) of every tensor one target contributes to the saved adapter,
    following `state_io.state_tensors`; `part` says what it is (bases / scalars / tasks / lora)."""
    k = p + m
    state = f"{name}.keeplora_state"
    out = []
    complement = (m if keep_principal else k) > d_in - k and tasks > 0
    if complement:
        if keep_principal:
            out.append((f"{state}.principal", basis_bytes, d_in * p, "bases"))
        else:
            out.append((f"{state}.principal", 8, p, "scalars"))  # the p energies, float64
        out.append((f"{state}.complement", basis_bytes, d_in * (d_in - k), "bases"))
    else:
        out.append((f"{state}.principal", basis_bytes, d_in * p, "bases"))
        out.append((f"{state}.memory", basis_bytes, d_in * m, "bases"))
    out.append((f"{state}.merged_tasks", 8, 1, "scalars"))
    out.append((f"{state}.fingerprint", 4, d_out * 2, "scalars"))
    for t in range(tasks):
        out.append((f"{state}.task{t}.lora_A", 4, r * d_in, "tasks"))
        out.append((f"{state}.task{t}.lora_B", 4, d_out * r, "tasks"))
        out.append((f"{state}.task{t}.scaling", 8, 1, "scalars"))
    out.append((f"{name}.lora_A.weight", 4, r * d_in, "lora"))
    out.append((f"{name}.lora_B.weight", 4, d_out * r, "lora"))
    return out


def layout(d_in: int, p: int, m: int, *, keep_principal: bool = False) -> str:
    k = p + m
    return "complement" if (m if keep_principal else k) > d_in - k else "bases"


def file_bytes(tensors: list[tuple[str, int, int, str]]) -> int:
    """Size of a safetensors file of these tensors: 8 + the JSON header (padded to 8) + the data.

    The header is built as the safetensors writer builds it (compact JSON, one entry per tensor with dtype, shape and
    offsets, plus `__metadata__`); shapes are given as one dimension, which differs from the real ones by a few
    characters per tensor (checked against real files in `formula_check`)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    globals_ = [("keeplora_state.task_index", 8, 1), ("keeplora_state.in_task", 8, 1),
                ("keeplora_state.checksum", 1, 32)]
    for key, size, count, *_ in [*tensors, *globals_]:
        header[key] = {"dtype": SAFETENSORS_DTYPE.get(size, "U8"), "shape": [count, 1],
                       "data_offsets": [offset, offset + size * count]}
        offset += size * count
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text) / 8) * 8 + offset


def sizes(layers: list[dict], r: int, tasks: int, basis_bytes: int, *, keep_principal: bool = False) -> dict:
    """Bytes of the state in memory (by part) and of the saved adapter for `layers` (dicts with name, d_in, d_out,
    p, m). In memory a state holds its bases, its finished tasks, the p principal energies (float64) and the weight
    fingerprint (d_out x 2, float32); the live LoRA factors are the adapter's parameters, counted apart."""
    parts = {"bases": 0, "scalars": 0, "tasks": 0, "lora": 0}
    everything, layouts = [], {"bases": 0, "complement": 0}
    for layer in layers:
        tensors = layer_tensors(layer["name"], layer["d_in"], layer["d_out"], layer["p"], layer["m"], r, tasks,
                                basis_bytes, keep_principal=keep_principal)
        for _, size, count, part in tensors:
            parts[part] += size * count
        everything += tensors
        layouts[layout(layer["d_in"], layer["p"], layer["m"], keep_principal=keep_principal)] += 1
    scalars = sum(8 * layer["p"] + 8 * layer["d_out"] for layer in layers)
    return {
        "state_memory_bytes": parts["bases"] + parts["tasks"] + scalars,
        "bases_bytes": parts["bases"],
        "finished_tasks_bytes": parts["tasks"],
        "energies_and_fingerprints_bytes": scalars,
        "lora_bytes": parts["lora"],
        "adapter_file_bytes": file_bytes(everything),
        "layers_by_layout": layouts,
    }


# -- ranks measured on the demo model ------------------------------------------------------------------------------


def _target(name: str) -> tuple[str, int, str] | None:
    """(tower, layer index, target type) of a target module name."""
    for tower, pattern in (("language", _LANGUAGE), ("vision", _VISION)):
        match = pattern.search(name)
        if match:
            return tower, int(match[1]), match[2]
    return None


def _state_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state") and "default" in m.keeplora_state}


def _read_file(path: Path) -> dict[str, tuple[str, list[int], int]]:
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def measure_demo(tasks: int, train_size: int, steps: int, data_dir: Path, seed: int) -> dict:
    """Ranks of every target after each task, the saved file and the formula's prediction of it."""
    names = SEQUENCE[:tasks]
    data = task_datasets(names, train_size, data_dir, seed)
    torch.manual_seed(seed)
    model, collator = demo_keeplora(torch.float32)
    config = model.peft_config["default"]
    per_task = []
    with tempfile.TemporaryDirectory() as tmp:
        for t, name in enumerate(names):
            start = time.perf_counter()
            losses = run_task(model, data[name], collator, steps=steps, seed=seed + t)
            seconds = time.perf_counter() - start
            directory = Path(tmp) / f"task{t}"
            model.save_pretrained(directory)
            path = directory / "adapter_model.safetensors"
            saved = _read_file(path)
            rows = []
            for module_name, module in _state_layers(model).items():
                where = _target(module_name)
                state = module.keeplora_state["default"]
                base = module.get_base_layer()
                prefix = module_name  # the saved keys are the PEFT module names
                rows.append({
                    "name": module_name, "tower": where[0] if where else "other", "layer": where[1] if where else None,
                    "type": where[2] if where else None, "d_in": base.in_features, "d_out": base.out_features,
                    "p": state.principal_rank, "m": state.memory_rank,
                    "layout": "complement" if state.complement is not None else "bases",
                    "saved_bases_bytes": sum(
                    size for key, (_, shape, size) in saved.items()
                    if key.startswith(f"{prefix}.keeplora_state.") and len(shape) == 2
                    and key.rsplit(".", 1)[1] in ("principal", "memory", "complement")
                ),
                })
            predicted = sizes(rows, config.r, t + 1, 4)
            actual = path.stat().st_size
            summary = {
                "task": t + 1, "name": name, "seconds": seconds, **losses,
                "file_bytes": actual, "predicted_file_bytes": predicted["adapter_file_bytes"],
                "file_prediction_error": predicted["adapter_file_bytes"] / actual - 1,
                "saved_bases_bytes": sum(r["saved_bases_bytes"] for r in rows),
                "predicted_bases_bytes": predicted["bases_bytes"],
                "layers": rows,
            }
            per_task.append(summary)
            language = [r for r in rows if r["tower"] == "language"]
            print(
                f"task {t + 1} ({name}, {seconds:.0f}s, loss {losses['first_loss']:.2f}->{losses['last_loss']:.2f}): "
                f"language k/d_in median {statistics.median((r['p'] + r['m']) / r['d_in'] for r in language):.3f}, "
                f"file {actual} B, formula {predicted['adapter_file_bytes']} B "
                f"({summary['file_prediction_error']:+.2%})",
                flush=True,
            )
    return {"config": {"r": config.r, "principal_energy": config.principal_energy,
                       "feature_energy": config.feature_energy, "state_dtype": config.state_dtype,
                       "keep_principal_basis": config.keep_principal_basis},
            "tasks": list(names), "train_size": train_size, "steps_per_task": steps, "per_task": per_task}


def fractions(measured: dict) -> dict:
    """p / d_in and cumulative m_T / d_in per decoder target type and demo layer (and per-type means, for the table)."""
    per_task = measured["per_task"]
    first = [r for r in per_task[0]["layers"] if r["tower"] == "language"]
    depth = sorted({r["layer"] for r in first})
    out = {"layers": len(depth), "by_type": {}}
    for kind in SHAPES_7B:
        rows = {r["layer"]: r for r in first if r["type"] == kind}
        entry = {"p_over_d_in": [rows[j]["p"] / rows[j]["d_in"] for j in depth], "m_over_d_in": {}}
        for summary in per_task:
            found = {r["layer"]: r for r in summary["layers"] if r["tower"] == "language" and r["type"] == kind}
            entry["m_over_d_in"][summary["task"]] = [found[j]["m"] / found[j]["d_in"] for j in depth]
        entry["mean_p_over_d_in"] = statistics.mean(entry["p_over_d_in"])
        entry["mean_m_over_d_in"] = {t: statistics.mean(v) for t, v in entry["m_over_d_in"].items()}
        out["by_type"][kind] = entry
    out["vision_means"] = {
        kind: {
            "p_over_d_in": statistics.mean(r["p"] / r["d_in"] for r in per_task[0]["layers"] if r["type"] == kind),
            "m_over_d_in": {s["task"]: statistics.mean(r["m"] / r["d_in"] for r in s["layers"] if r["type"] == kind
                                                        and r["tower"] == "vision") for s in per_task},
        }
        for kind in sorted({r["type"] for r in per_task[0]["layers"] if r["tower"] == "vision"})
    }
    return out


def layers_7b(frac: dict, tasks: int, *, memory_scale: float = 1.0) -> list[dict]:
    """The 224 decoder targets of LLaVA-1.5-7B with p and m_T from the demo's fractions (depth-mapped)."""
    demo_layers = frac["layers"]
    out = []
    for i in range(LAYERS_7B):
        j = i * demo_layers // LAYERS_7B
        for kind, (d_in, d_out) in SHAPES_7B.items():
            entry = frac["by_type"][kind]
            p = round(entry["p_over_d_in"][j] * d_in)
            m = min(round(memory_scale * entry["m_over_d_in"][tasks][j] * d_in), d_in - p) if tasks else 0
            out.append({"name": f"base_model.model.model.language_model.layers.{i}.{PARENT[kind]}.{kind}",
                        "d_in": d_in, "d_out": d_out, "p": p, "m": m})
    return out


def extrapolate(frac: dict, checkpoints: tuple[int, ...]) -> dict:
    out = {}
    for tasks in checkpoints:
        layers = layers_7b(frac, tasks)
        row = {
            "tasks": tasks,
            "median_k_over_d_in": statistics.median((l["p"] + l["m"]) / l["d_in"] for l in layers),
            "by_state_dtype": {d: sizes(layers, RANK_7B, tasks, b) for d, b in STATE_DTYPES.items()},
            "keep_principal_basis_true": {d: sizes(layers, RANK_7B, tasks, b, keep_principal=True)
                                          for d, b in STATE_DTYPES.items()},
            "memory_growth_x0.5": {d: sizes(layers_7b(frac, tasks, memory_scale=0.5), RANK_7B, tasks, b)
                                   for d, b in STATE_DTYPES.items()},
            "memory_growth_x2": {d: sizes(layers_7b(frac, tasks, memory_scale=2.0), RANK_7B, tasks, b)
                                 for d, b in STATE_DTYPES.items()},
            "ranks": {kind: {"p": [l["p"] for l in layers if l["name"].endswith(kind)][:: LAYERS_7B // frac["layers"]],
                             "m": [l["m"] for l in layers if l["name"].endswith(kind)][:: LAYERS_7B // frac["layers"]]}
                      for kind in SHAPES_7B},
        }
        out[tasks] = row
    values = LAYERS_7B * sum((d_in // 2) * d_in for d_in, _ in SHAPES_7B.values())  # min(k, d_in - k) <= d_in / 2
    bound = {d: values * b for d, b in STATE_DTYPES.items()}
    return {"by_tasks": out, "bases_bound_bytes_k_equal_d_half": bound}


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def markdown(frac: dict, extrapolated: dict, measured: dict) -> str:
    lines = [
        "Ranks measured on the demo VLM (decoder 4 x 128, MLP 512; mean over its 4 decoder layers) and applied, layer "
        "by layer, to LLaVA-1.5-7B's shapes:",
        "",
        "| target (7B d_in) | p / d_in | m / d_in after 1 task | after 4 | after 8 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, entry in frac["by_type"].items():
        means = entry["mean_m_over_d_in"]
        cells = [f"{means[t]:.3f}" if t in means else "n/a" for t in CHECKPOINTS]
        lines.append(f"| {kind} ({SHAPES_7B[kind][0]}) | {entry['mean_p_over_d_in']:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "LLaVA-1.5-7B, 224 decoder targets, r = 32, epsilon_w = 0.6, epsilon_f = 0.99, default layout "
        "(`keep_principal_basis=False`); GB = 1e9 bytes:",
        "",
        "| tasks | layout (bases / complement) | subspace bases, float32 | bases, bfloat16 | finished tasks (float32) | "
        "state in memory, float32 / bfloat16 | saved adapter, float32 / bfloat16 state |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tasks, row in extrapolated["by_tasks"].items():
        f32, b16 = row["by_state_dtype"]["float32"], row["by_state_dtype"]["bfloat16"]
        lay = f32["layers_by_layout"]
        lines.append(
            f"| {tasks} | {lay['bases']} / {lay['complement']} | {_gb(f32['bases_bytes'])} | {_gb(b16['bases_bytes'])} | "
            f"{_gb(f32['finished_tasks_bytes'])} | {_gb(f32['state_memory_bytes'])} / {_gb(b16['state_memory_bytes'])} | "
            f"{_gb(f32['adapter_file_bytes'])} / {_gb(b16['adapter_file_bytes'])} |"
        )
    bound = extrapolated["bases_bound_bytes_k_equal_d_half"]
    errors = [abs(s["file_prediction_error"]) for s in measured["per_task"]]
    lines += [
        "",
        f"Upper bound of the bases whatever the ranks (every layer at k = d_in / 2): {_gb(bound['float32'])} GB float32, "
        f"{_gb(bound['bfloat16'])} GB bfloat16. The size formula reproduces the demo's saved adapter files to within "
        f"{max(errors):.2%}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=480, help="training samples per task (the demo's 480)")
    parser.add_argument("--steps", type=int, default=45, help="AdamW steps per task (45: the demo's 3 epochs of 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "keeplora_demo_tasks"))
    args = parser.parse_args()
    configure_threads()
    measured = measure_demo(args.tasks, args.train_size, args.steps, Path(args.data_dir), args.seed)
    frac = fractions(measured)
    checkpoints = tuple(t for t in CHECKPOINTS if t <= args.tasks)
    extrapolated = extrapolate(frac, checkpoints)
    table = markdown(frac, extrapolated, measured)
    result = {
        "model": "LLaVA-1.5-7B decoder (32 layers, hidden 4096, MLP 11008; q,k,v,o,gate,up,down: 224 targets), "
                 f"r = {RANK_7B}, sizes from shapes and ranks measured on the shipped demo VLM",
        "measured_on": measured,
        "fractions_applied": frac,
        "llava_1.5_7b": extrapolated,
        "markdown": table,
    }
    print(table)
    print(write_result("state_size_llava-1.5-7b", result))


if __name__ == "__main__":
    main()
