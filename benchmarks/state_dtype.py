"""Goal 3: which `state_dtype` for a bfloat16 model. float32, bfloat16 and float16 bases side by side on the shipped
demo VLM loaded in bfloat16, through the same tasks (`demo_sequence.py`; finished tasks are a float32 branch there).

After each task, for every target:

- orthonormality of the stored bases: `|Q^T Q - I|_2` of what the state holds (`[principal, memory]`, or the
  complement), in float64;
- subspace rotation: `sin` of the largest principal angle between the stored subspace and the intended one, i.e. the
  principal basis as computed (float32) and every memory direction as `end_task` found it, before the cast to
  `state_dtype` (captured by wrapping the library's functions, which are left unchanged);
- protection of the task's learned update `dW = s B A` against the subspace protected during the task (fixed at
  begin_task): `|dW P|_F / |dW|_F` with `P` the stored basis re-orthonormalised in float64 (what the library
  projects against), and with `P` the intended basis (what should have been protected);
- output change on protected inputs relative to random inputs: mean `|dW x| / |x|` over 256 Gaussian inputs inside
  the intended protected subspace, over the same for 256 Gaussian inputs in R^d_in;
- the same ratio on real inputs of every earlier task (the target's input activations on 64 samples of each finished
  task, outside its statistics subset, at that task's end): what forgetting the layer can cause, including the
  (1 - feature_energy) the memory leaves out by design;
- the output change on those protected inputs relative to the layer's own output (`|dW x| / |W x|`), to set
  against the bfloat16 rounding of every layer output (relative 2^-8 = 3.9e-3 at most, about 1e-3 typically);
- the held-out loss of the first task, the ranks, the bytes of the bases in memory and the saved adapter's size;
- at LLaVA-1.5-7B's sizes (`shapes_7b`): the orthonormality error, rotation and update share of a random
  orthonormal basis of the 7B's d_in x k rounded to each dtype.

    python benchmarks/state_dtype.py                  # ~11 min: results/state_dtype_demo-bf16.json and its tables
    python benchmarks/state_dtype.py --part shapes    # the 7B-size part only (~1 min), the rest kept
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import keeplora_hf
from demo_sequence import SEQUENCE, demo_keeplora, held_out, mean_loss, run_task, task_datasets
from measure import configure_threads, read_result, write_result

NAME = "state_dtype_demo-bf16"
DTYPES = ("float32", "bfloat16", "float16")
PROBES = 256
F64 = torch.float64


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    if columns.shape[1] == 0:
        return columns
    return torch.linalg.qr(columns.to(F64))[0]


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the orthogonal complement of orthonormal `basis` (d x k), float64."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=F64)
    q, _ = torch.linalg.qr(basis, mode="complete")
    return q[:, k:]


def _orthonormality_error(q: torch.Tensor) -> float:
    q = q.to(F64)
    return float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=F64), ord=2)) if q.shape[1] else 0.0


class Intended:
    """Records, per layer state, the principal basis and the memory directions before they are cast to state_dtype.

    Wraps `first_task_state` where `begin_task` looks it up, the `principal_basis` it calls, and the state class's
    `add_memory`; the wrapped functions run unchanged."""

    def __init__(self) -> None:
        self.principal: dict[int, torch.Tensor] = {}
        self.memory: dict[int, list[torch.Tensor]] = {}
        self._last = None
        self._patched: list[type] = []
        lifecycle = keeplora_hf.begin_task.__globals__
        first_task_state = lifecycle["first_task_state"]
        inner = first_task_state.__globals__
        principal_basis = inner["principal_basis"]

        def recording_principal_basis(*args, **kwargs):
            out = principal_basis(*args, **kwargs)
            self._last = (out[0] if isinstance(out, tuple) else out).detach().to(F64).clone()
            return out

        def recording_first_task_state(*args, **kwargs):
            state = first_task_state(*args, **kwargs)
            self.principal[id(state)] = self._last
            self.memory[id(state)] = []
            cls = type(state)
            if not getattr(cls.add_memory, "_recording", False):
                add_memory = cls.add_memory

                def recording_add_memory(obj, new, *a, **k):
                    self.memory.setdefault(id(obj), []).append(new.detach().to(F64).clone())
                    return add_memory(obj, new, *a, **k)

                recording_add_memory._recording = True
                recording_add_memory._original = add_memory
                cls.add_memory = recording_add_memory
                self._patched.append(cls)
            return state

        inner["principal_basis"] = recording_principal_basis
        lifecycle["first_task_state"] = recording_first_task_state
        self._undo = (lifecycle, first_task_state, inner, principal_basis)

    def basis(self, state) -> torch.Tensor:
        """Orthonormal basis (float64) of the protected subspace as intended: principal + every memory direction."""
        return _orthonormal(torch.cat([self.principal[id(state)], *self.memory[id(state)]], dim=1))

    def close(self) -> None:
        """Put the library's functions back."""
        lifecycle, first_task_state, inner, principal_basis = self._undo
        lifecycle["first_task_state"] = first_task_state
        inner["principal_basis"] = principal_basis
        for cls in self._patched:
            cls.add_memory = cls.add_memory._original


def _layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "keeplora_state") and "default" in m.keeplora_state}


def stored_tensors(state) -> dict[str, torch.Tensor]:
    return {k: t for k, t in (("principal", state.stored_principal), ("memory", state._memory),
                               ("complement", state.complement)) if t is not None}


def stored_protected(state) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stored basis as held: [principal, memory] or the complement; the protected subspace it defines,
    re-orthonormalised in float64)."""
    held = stored_tensors(state)
    if "complement" in held:
        raw = held["complement"]
        return raw, _complement(_orthonormal(raw))
    raw = torch.cat([held["principal"].to(F64), held.get("memory", held["principal"][:, :0]).to(F64)], dim=1)
    return raw, _orthonormal(raw)


def _sin_largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between the spans of orthonormal a and b (same dimension)."""
    if a.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2))


def _output_ratio(delta: torch.Tensor, inside: torch.Tensor, random: torch.Tensor) -> float:
    """mean |dW x| / |x| over `inside` rows, over the same for `random` rows."""
    def mean_gain(x):
        return float(((x @ delta.T).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)).mean())
    denominator = mean_gain(random)
    return mean_gain(inside) / denominator if denominator > 0 else 0.0


def _relative_change(delta: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> float:
    """mean |dW x| / |W x| over the rows of x."""
    return float(((x @ delta.T).norm(dim=1) / (x @ weight.T).norm(dim=1).clamp_min(1e-30)).mean())


def _capture_inputs(model, loader, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Each target's input rows on `loader` (every position, padding included: the layer sees those too), `tokens`
    of them sampled."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in _layers(model).items():
        def hook(mod, args, name=name):
            rows.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        mean_loss(model, loader)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, chunks in rows.items():
        x = torch.cat(chunks)
        x = x[x.norm(dim=1) > 0]
        pick = torch.randperm(x.shape[0], generator=g)[:tokens]
        out[name] = x[pick].to(F64)
    return out


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "max": None}
    return {"median": statistics.median(values), "max": max(values)}


def run(dtype: str, tasks: int, data: dict, collator_steps: int, seed: int, tokens: int) -> dict:
    intended = Intended()
    try:
        return _run(intended, dtype, tasks, data, collator_steps, seed, tokens)
    finally:
        intended.close()


def _run(intended: Intended, dtype: str, tasks: int, data: dict, collator_steps: int, seed: int, tokens: int) -> dict:
    torch.manual_seed(seed)
    model, collator = demo_keeplora(torch.bfloat16, state_dtype=dtype)
    names = SEQUENCE[:tasks]
    first_eval = held_out(data[names[0]], collator, 64, seed)
    old_inputs: list[dict[str, torch.Tensor]] = []
    per_task = []
    g = torch.Generator().manual_seed(1234)
    with tempfile.TemporaryDirectory() as tmp:
        for t, name in enumerate(names):
            snapshot: dict[str, dict] = {}
            before: dict[str, torch.Tensor] = {}

            def after_begin(model):
                for layer, module in _layers(model).items():
                    state = module.keeplora_state["default"]
                    _, stored = stored_protected(state)
                    snapshot[layer] = {"stored": stored, "intended": intended.basis(state)}
                    before[layer] = keeplora_hf.learned_update(model, layer).to(F64)

            start = time.perf_counter()
            losses = run_task(model, data[name], collator, steps=collator_steps, seed=seed + t, after_begin=after_begin)
            seconds = time.perf_counter() - start
            rows = []
            for layer, module in _layers(model).items():
                state = module.keeplora_state["default"]
                delta = keeplora_hf.learned_update(model, layer).to(F64) - before[layer]
                raw, stored = stored_protected(state)
                wanted = intended.basis(state)
                during_s, during_i = snapshot[layer]["stored"], snapshot[layer]["intended"]
                d_in = delta.shape[1]
                weight = module.get_base_layer().weight.detach().to(F64)  # bfloat16 base: tasks are a branch
                inside = (torch.randn(PROBES, during_i.shape[1], generator=g, dtype=F64) @ during_i.T)
                random = torch.randn(PROBES, d_in, generator=g, dtype=F64)
                norm = float(delta.norm())
                real = None
                if old_inputs:
                    x = torch.cat([inputs[layer] for inputs in old_inputs])
                    real = _output_ratio(delta, x, random)
                rows.append({
                    "layer": layer, "d_in": d_in, "p": state.principal_rank, "m": state.memory_rank,
                    "layout": "complement" if state.complement is not None else "bases",
                    "stored_dtype": str(raw.dtype).removeprefix("torch."),
                    "orthonormality_error": max(_orthonormality_error(raw),
                                                *(_orthonormality_error(v) for v in stored_tensors(state).values())),
                    "rotation_sin": _sin_largest_angle(wanted, stored) if stored.shape[1] == wanted.shape[1] else None,
                    "update_share_in_stored": float((delta @ during_s).norm()) / norm if norm else None,
                    "update_share_in_intended": float((delta @ during_i).norm()) / norm if norm else None,
                    "output_inside_over_random": _output_ratio(delta, inside, random) if norm else None,
                    "output_old_tasks_over_random": real,
                    "output_inside_over_base_output": _relative_change(delta, weight, inside) if norm else None,
                    "bases_bytes": sum(v.numel() * v.element_size() for v in stored_tensors(state).values()),
                })
            old_inputs.append(_capture_inputs(model, held_out(data[name], collator, 64, seed + t), tokens, seed + t))
            directory = Path(tmp) / f"{dtype}-{t}"
            model.save_pretrained(directory)
            summary = {
                "task": t + 1, "name": name, "seconds": seconds, **losses,
                "first_task_held_out_loss": mean_loss(model, first_eval),
                "bases_bytes": sum(r["bases_bytes"] for r in rows),
                "adapter_file_bytes": (directory / "adapter_model.safetensors").stat().st_size,
                "layers_as_complement": sum(r["layout"] == "complement" for r in rows),
                "mean_k_over_d_in": statistics.mean((r["p"] + r["m"]) / r["d_in"] for r in rows),
                **{key: _summary([r[key] for r in rows]) for key in (
                    "orthonormality_error", "rotation_sin", "update_share_in_stored", "update_share_in_intended",
                    "output_inside_over_random", "output_old_tasks_over_random", "output_inside_over_base_output")},
                "layers": rows,
            }
            per_task.append(summary)
            print(dtype, {k: v for k, v in summary.items() if k != "layers"}, flush=True)
    for summary in per_task[:-1]:  # per-layer rows of the last task only: the summaries say the rest
        summary.pop("layers")
    return {"per_task": per_task}


def shapes_7b(seed: int, rank: int = 32) -> dict:
    """The rounding of a stored basis at LLaVA-1.5-7B's sizes: a random orthonormal d_in x k basis (k of the 7B after 8
    tasks from `state_size_7b.py`'s result, when there is one) cast to each dtype, then what the library does with it
    (re-orthonormalisation), the rotation from the exact basis and the share of residual-projected rows (r = 32, as
    A is built) that lies inside the exact subspace. A Haar-random basis stands for a real one: both are delocalised
    (entries ~ 1/sqrt(d_in)), which is what the relative rounding acts on."""
    ks = {"q_proj": 848, "gate_proj": 1343, "down_proj": 2356}  # fallback: state_size_7b.py's medians after 8 tasks
    previous = read_result("state_size_llava-1.5-7b")
    if previous:
        ranks = previous["llava_1.5_7b"]["by_tasks"].get("8", {}).get("ranks")
        if ranks:
            ks = {kind: int(statistics.median(p + m for p, m in zip(ranks[kind]["p"], ranks[kind]["m"]))) for kind in ks}
    d_in = {"q_proj": 4096, "gate_proj": 4096, "down_proj": 11008}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind, k in ks.items():
        d = d_in[kind]
        exact = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]
        rows = torch.randn(rank, d, generator=g, dtype=F64)
        entry = {"d_in": d, "k": k}
        for dtype in DTYPES:
            held = exact.to(getattr(torch, dtype)).to(F64)
            gram = held.T @ held - torch.eye(k, dtype=F64)
            stored = torch.linalg.qr(held)[0]
            cosines = torch.linalg.svdvals(exact.T @ stored)
            residual = rows - (rows @ stored) @ stored.T
            entry[dtype] = {
                "orthonormality_error": float(torch.linalg.eigvalsh(gram).abs().max()),
                "rotation_sin": float(torch.sqrt((1 - cosines.min() ** 2).clamp_min(0))),
                "update_share_in_intended": float((residual @ exact).norm() / residual.norm()),
                "bytes": d * k * torch.finfo(getattr(torch, dtype)).bits // 8,
            }
        out[kind] = entry
        print("7B shape", kind, entry, flush=True)
    return out


def markdown(by_dtype: dict, shapes: dict | None = None) -> str:
    tasks = len(next(iter(by_dtype.values()))["per_task"])
    lines = [
        f"Demo VLM in bfloat16 (finished tasks as a float32 branch), {tasks} tasks; medians over the "
        f"{len(next(iter(by_dtype.values()))['per_task'][-1]['layers'])} targets (max in brackets), after the last task "
        "unless said:",
        "",
        "| state_dtype | bases in memory | saved adapter | `|Q^T Q - I|_2` stored | rotation vs intended (sin) | "
        "update in stored subspace | update in intended subspace | output on protected / random inputs | "
        "output on earlier tasks' inputs / random | task-1 held-out loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(s, digits="1e"):
        if s["median"] is None:
            return "n/a"
        return f"{s['median']:.1e} ({s['max']:.1e})"

    for dtype, result in by_dtype.items():
        last = result["per_task"][-1]
        worst = {key: {"median": max(t[key]["median"] for t in result["per_task"] if t[key]["median"] is not None),
                       "max": max(t[key]["max"] for t in result["per_task"] if t[key]["max"] is not None)}
                 for key in ("update_share_in_stored", "update_share_in_intended", "output_inside_over_random")}
        lines.append(
            f"| {dtype} | {last['bases_bytes'] / 1024:.0f} KiB | {last['adapter_file_bytes'] / 1024:.0f} KiB | "
            f"{cell(last['orthonormality_error'])} | {cell(last['rotation_sin'])} | "
            f"{cell(worst['update_share_in_stored'])} | {cell(worst['update_share_in_intended'])} | "
            f"{cell(worst['output_inside_over_random'])} | {cell(last['output_old_tasks_over_random'])} | "
            f"{last['first_task_held_out_loss']:.3f} |"
        )
    lines += ["", "The update and output columns are the worst task's median (and the worst layer of any task).", "",
              "Per task (median over targets): rotation vs intended / update share in the intended subspace / output "
              "change on protected inputs relative to the layer's output `|dW x| / |W x|`:", "",
              "| state_dtype | " + " | ".join(f"task {t + 1}" for t in range(tasks)) + " |",
              "| --- | " + " | ".join("---:" for _ in range(tasks)) + " |"]
    for dtype, result in by_dtype.items():
        cells = []
        for t in result["per_task"]:
            values = [t[k]["median"] for k in ("rotation_sin", "update_share_in_intended", "output_inside_over_base_output")]
            cells.append(" / ".join("n/a" if v is None else f"{v:.1e}" for v in values))
        lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
    if shapes:
        lines += ["", "The same rounding at LLaVA-1.5-7B's sizes (a random orthonormal d_in x k basis, k after 8 tasks; "
                  "`|Q^T Q - I|_2` / rotation (sin) / share inside the exact subspace of rows made orthogonal to the "
                  "stored one):", "",
                  "| state_dtype | " + " | ".join(f"{kind} (d_in {v['d_in']}, k {v['k']})" for kind, v in shapes.items())
                  + " |", "| --- | " + " | ".join("---:" for _ in shapes) + " |"]
        for dtype in DTYPES:
            cells = [" / ".join(f"{v[dtype][key]:.1e}" for key in ("orthonormality_error", "rotation_sin",
                                                                     "update_share_in_intended")) for v in shapes.values()]
            lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "sequence", "shapes"), default="all",
                        help="one part only; the other is kept from the existing results file")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1024, help="input rows kept per target and finished task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "keeplora_demo_tasks"))
    args = parser.parse_args()
    configure_threads()
    result = (read_result(NAME) or {}) if args.part != "all" else {}
    result.pop("benchmark", None)
    result.pop("environment", None)
    if args.part in ("all", "sequence"):
        data = task_datasets(SEQUENCE[: args.tasks], args.train_size, Path(args.data_dir), args.seed)
        result.update({
            "model": "shipped demo VLM (keeplora_hf/assets/demo_vlm) in bfloat16, KeepLoRA++ as `keeplora-hf demo` "
                     "wraps it (r = 8, alpha 16, vision + language targets)",
            "tasks": list(SEQUENCE[: args.tasks]), "train_size": args.train_size, "steps_per_task": args.steps,
            "by_state_dtype": {d: run(d, args.tasks, data, args.steps, args.seed, args.tokens) for d in args.dtypes},
        })
    if args.part in ("all", "shapes"):
        result["shapes_7b"] = shapes_7b(args.seed)
    result["markdown"] = markdown(result["by_state_dtype"], result.get("shapes_7b"))
    print(result["markdown"])
    print(write_result(NAME, result))


if __name__ == "__main__":
    main()
