"""Build results/RESULTS.md (the tables of docs/performance.md) from the JSON files the benchmarks wrote."""

from __future__ import annotations

import statistics
from pathlib import Path

from measure import RESULTS, read_result

MODELS = ("llava-100m", "tiny-llava")
MEMORY_RUNS = ("llava-100m", "llava-100m_batch1", "tiny-llava")


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(value, target, *, upper: bool = True) -> str:
    if value is None:
        return "not run"
    return "met" if (value <= target if upper else value >= target) else "**not met**"


def _goal_rows() -> list[str]:
    rows = []
    # 1. step time
    for model in MODELS:
        r = read_result(f"step_time_{model}")
        if not r:
            continue
        frozen, trained = r["ratio_keeplora_over_lora"], r["ratio_keeplora_train_A_over_lora"]
        rows.append(
            f"| 1 | step time, KeepLoRA++ (frozen A) / PEFT LoRA, {model} | {_f(frozen['median'])} "
            f"(ratio of medians {_f(frozen['ratio_of_medians'])}) | <= 1.00 | {_met(frozen['median'], 1.0)} |"
        )
        rows.append(
            f"| 1 | step time, KeepLoRA++ (train_lora_A) / PEFT LoRA, {model} | {_f(trained['median'])} "
            f"(ratio of medians {_f(trained['ratio_of_medians'])}) | <= 1.10 | {_met(trained['median'], 1.10)} |"
        )
    # 2. boundary
    for model in MODELS:
        r = read_result(f"boundary_{model}")
        if not r or "fast" not in r["summary"]:
            continue
        s = r["summary"]["fast"]
        later = s["later_tasks_boundary_over_epoch_median"]
        data = _data_pass_ratio(r, "fast")
        rows.append(
            f"| 2 | (begin_task + end_task) / epoch, later tasks, {model} ({r['epoch_batches']}-batch epoch) | "
            f"{_f(later)} (data passes alone: {_f(data)}) | <= 0.25 | {_met(later, 0.25)} |"
        )
        rows.append(
            f"| 2 | the same, first task (with the principal bases, once per sequence), {model} | "
            f"{_f(s['first_task_boundary_over_epoch'])} | <= 0.25 | {_met(s['first_task_boundary_over_epoch'], 0.25)} |"
        )
    # 3. memory
    for model in MEMORY_RUNS:
        r = read_result(f"memory_{model}")
        if not r:
            continue
        ratio = r["ratios"].get("begin_task_first_over_lora_step")
        own = r["ratios_without_interpreter"].get("begin_task_first_over_lora_step")
        rows.append(
            f"| 3 | peak RSS begin_task / LoRA training step, {model} | {_f(ratio)} (without the interpreter's "
            f"{_f(r['samples']['lora_step'][0]['interpreter_mib'], 0)} MiB: {_f(own)}) | <= 1.25 | {_met(own, 1.25)} |"
        )
    # 4. state size
    for model in MODELS:
        r = read_result(f"state_size_{model}")
        if not r:
            continue
        for config, tasks in r["by_config"].items():
            last = tasks[-1]
            within = last["layers_within_min_k_bound"]
            rows.append(
                f"| 4 | subspace state after {len(tasks)} tasks, {config}, {model} | {last['total_values'] / 1e6:.3f}M "
                f"values ({last['total_values'] / last['total_bound_min_k']:.2f}x the bound; full bases "
                f"{last['total_full_basis_values'] / 1e6:.3f}M), {last['total_disk_bytes'] / 2**20:.1f} MiB on disk; "
                f"{within}/{last['layer_count']} layers within the bound (+ {sum(x['scalars'] for x in last['layers'])} "
                f"scalars: principal energies) | <= min(k, d-k) d per layer | "
                f"{'met' if within == last['layer_count'] else '**not met**'} |"
            )
    # 5. principal
    r = read_result("principal_7b_shapes")
    if r:
        for label, v in r["per_shape"].items():
            rows.append(
                f"| 5 | principal subspace of a {label} matrix: ours / torch.linalg.svd | {_f(v['ours_s'], 1)} s / "
                f"{_f(v['torch_svd_s'], 1)} s = {_f(v['speedup'], 1)}x faster | measure | - |"
            )
        e = r["extrapolation_224_layers"]
        rows.append(
            f"| 5 | all 224 targets of LLaVA-1.5-7B, this CPU (extrapolated) | {_f(e['ours_hours'], 2)} h vs "
            f"{_f(e['torch_svd_hours'], 2)} h ({_f(e['speedup'], 1)}x) | measure | - |"
        )
    # 6. accuracy
    r = read_result("accuracy_sequence")
    if r:
        for name in r["fast_minus_exact"]:
            cells, worst = [], 0.0
            for m in ("mfn", "bwt", "maa"):
                diffs = [a[m] - b[m] for a, b in zip(r["runs"][name], r["runs"]["exact"])]
                mean = statistics.mean(diffs)
                se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
                worst = max(worst, abs(mean) / se if se else float("inf"))
                cells.append(f"{m.upper()} {mean:+.3f} ± {se:.3f} (exact: {r['summary']['exact'][m]['mean']:.3f})")
            rows.append(
                f"| 6 | {name} − exact, tiny-LLaVA 3-task sequence, {r['seeds']} seeds (paired mean ± standard error) | "
                f"{'; '.join(cells)} | within noise (abs(t) < 2) | {'met' if worst < 2 else '**not met**'} |"
            )
    r = read_result("accuracy_layers_llava-100m")
    if r:
        g, p, m = r["gradient_sketch"], r["principal"], r["memory"]
        rows.append(
            f"| 6 | per-layer agreement, llava-100m ({r['layer_count']} layers) | sketched A captures "
            f"{_f(g['captured_ratio']['median'], 3)} (min {_f(g['captured_ratio']['min'], 3)}) of the exact A's residual-"
            f"gradient energy; principal: same p in {p['same_p']}/{r['layer_count']}, largest angle "
            f"{p['largest_angle_rad']['max']:.1e} rad; memory: {m['count_randomized_total']} vs {m['count_eigh_total']} "
            f"directions, criterion met (min explained {m['min_explained_randomized']:.4f}) | within noise | see 6 above |"
        )
    return rows


def _data_pass_ratio(result: dict, config: str) -> float | None:
    later = result["records"][config][1:]
    if not later:
        return None
    ratios = []
    for r in later:
        phases = {**r["begin_phases_s"], **r["end_phases_s"]}
        ratios.append((phases.get("gradient pass", 0.0) + phases.get("feature pass", 0.0)) / r["epoch_s"])
    return sorted(ratios)[len(ratios) // 2]


def _boundary_details() -> list[str]:
    lines = []
    for model in MODELS:
        r = read_result(f"boundary_{model}")
        if not r:
            continue
        lines += [
            f"\n**Task boundary, {model}** ({r['model']}; epoch of {r['epoch_batches']} batches, statistics on "
            f"{r['statistics_batches']}; seconds)\n",
            "| config | task | begin_task | end_task | epoch | (begin+end)/epoch | principal | gradient pass | "
            "A (exact SVD) | feature pass | memory update |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for config, records in r["records"].items():
            for rec in records:
                ph = {**rec["begin_phases_s"], **rec["end_phases_s"]}
                lines.append(
                    f"| {config} | {rec['task']} | {rec['begin_task_s']:.1f} | {rec['end_task_s']:.1f} | "
                    f"{rec['epoch_s']:.1f} | {rec['boundary_over_epoch']:.2f} | {ph.get('principal bases', 0):.1f} | "
                    f"{ph.get('gradient pass', 0):.1f} | {ph.get('A from the gradient (exact SVD)', 0):.1f} | "
                    f"{ph.get('feature pass', 0):.1f} | {ph.get('memory update', 0):.1f} |"
                )
    return lines


def _memory_details() -> list[str]:
    lines = []
    for model in MEMORY_RUNS:
        r = read_result(f"memory_{model}")
        if not r:
            continue
        lines += [
            f"\n**Peak resident memory, {model}** (MiB, median of {r['repeats']} fresh processes, batch size "
            f"{r.get('batch_size', 'default')}, {r['statistics_batches']} statistics batches; weights "
            f"{r['samples']['lora_step'][0]['weights_mib']:.0f} MiB)\n",
            "| operation | peak | peak without the interpreter | increase during the operation | / LoRA step (without interpreter) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, peak in r["peak_mib_median"].items():
            ratio = r["ratios_without_interpreter"].get(f"{name}_over_lora_step", 1.0)
            lines.append(
                f"| {name} | {peak:.0f} | {r['peak_without_interpreter_mib_median'][name]:.0f} | "
                f"{r['increase_mib_median'][name]:.0f} | {ratio:.2f} |"
            )
    return lines


def _step_details() -> list[str]:
    lines = []
    for model in MODELS:
        r = read_result(f"step_time_{model}")
        if not r:
            continue
        lines += [
            f"\n**Training step, {model}** (r = {r['rank']}, {r['rounds']} interleaved rounds, "
            f"{r['environment']['torch_threads']} thread(s); seconds)\n",
            "| method | median | min | max | trainable parameters |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, v in r["seconds_per_step"].items():
            lines.append(
                f"| {name} | {v['median']:.4f} | {v['min']:.4f} | {v['max']:.4f} | {r['trainable_parameters'][name]:,} |"
            )
    return lines


def _state_details() -> list[str]:
    """Goal 3 (state size): the LLaVA-1.5-7B state from measured ranks, and the state dtype on a bfloat16 model."""
    lines = []
    for name, title in (
        ("state_size_llava-1.5-7b", "State and saved adapter of LLaVA-1.5-7B (`state_size_7b.py`)"),
        ("state_dtype_demo-bf16", "State dtype on a bfloat16 model (`state_dtype.py`)"),
    ):
        r = read_result(name)
        if r and r.get("markdown"):
            lines += ["", f"## {title}", "", r["markdown"]]
    return lines


def write_report() -> Path:
    lines = [
        "# KeepLoRA++ performance benchmarks",
        "",
        "Written by `benchmarks/report.py` from the JSON files next to this one; regenerate everything with "
        "`python benchmarks/run_all.py`. Every ratio compares things measured side by side in one run "
        "(interleaved and repeated where timed; see `benchmarks/measure.py` for the timing and memory methods).",
        "",
        "| goal | what | measured | target | |",
        "| --- | --- | --- | --- | --- |",
        *_goal_rows(),
        *_step_details(),
        *_boundary_details(),
        *_memory_details(),
        *_state_details(),
    ]
    env = next((read_result(n) for n in ("step_time_llava-100m", "boundary_llava-100m") if read_result(n)), None)
    if env:
        e = env["environment"]
        lines += ["", f"Machine: {e['cpu']}, {e['cores']} cores (shared), torch {e['torch']}, Python {e['python']}."]
    path = RESULTS / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(write_report())
