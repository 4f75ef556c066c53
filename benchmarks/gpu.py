"""KeepLoRA++ against PEFT LoRA on a LLaVA-1.5-7B-shaped model in bfloat16, on one CUDA GPU.

The model is built from configs with random weights, directly on the device (CLIP ViT-L/14-336 tower, Llama-2-7B
decoder, vocabulary 32064; nothing is downloaded), and trained on text-only batches of random tokens, so no image
processing is needed. Both methods target the decoder's q, k, v, o, gate, up and down projections (224 layers) at
r = 32, lora_alpha = 8. In one run it measures:

1. the training step of PEFT LoRA and of KeepLoRA++ on the same model (one copy each) and the same batches: time
   (synchronized, interleaved, median after a warm-up step) and peak GPU memory;
2. `begin_task` and `end_task` over two tasks (each: begin_task on `--task-batches` batches, 1 + `--steps` AdamW
   steps, end_task): time and peak GPU memory;
3. exactness after each task, for every target (min / median / max over layers):
   - `finished_tasks="auto"` (the run itself; on a bfloat16 base it keeps finished tasks as a frozen float32 branch):
     the weight does not change, so the lost fraction is 0 by construction; reported are `learned_update` against
     the sum of the tasks' `s * B @ A`, the layer's output change on random inputs against `x @ learned.T` (beside
     its floor: the pre-trained bfloat16 output plus the exact change, rounded once), and the share of the task's
     update inside the subspace it had to avoid, `|dW P| / |dW|` (`P = protected_basis` at that task's begin_task);
   - `finished_tasks="merge"`, computed from the same run's per-layer updates: each task added into the bfloat16
     weight and rounded once, exactly as end_task's merge does (`apply_delta_`). Its lost fraction
     `|(W_after - W_before) - dW| / |dW|` (float32), its share in the protected subspace and its output change. Up to
     the first end_task a merge run is this run; task 2 stacks the merge on this run's second task;
   - the logits on one fixed batch just before against just after end_task (max abs diff), for both.
4. save -> load: `save_pretrained`, a rebuilt base (same seed), `PeftModel.from_pretrained`, the logits compared
   (max abs diff, bit-identical or not); time of save and of load;
5. the training step of a fresh task after 1, 4 and 8 finished tasks (random rank-r updates, a frozen branch on this
   bfloat16 base) against PEFT LoRA's, interleaved, without autocast (the branch in float32) and under bfloat16
   autocast (the recipes' setting: the branch in bfloat16 with `A` split in two halves).

Run it on a machine with one CUDA GPU (estimated at about 6 minutes on an H200):

    python benchmarks/gpu.py                  # writes results/gpu_llava-7b.json and results/GPU.md
    python benchmarks/gpu.py --tiny           # every shape shrunk, on the CPU when there is no GPU (seconds);
                                              # writes results/gpu_tiny.json and results/GPU_tiny.md

Progress goes to stderr. The test suite and CI never import or run this script.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import keeplora_hf  # noqa: F401  registers the KEEPLORA peft type
from keeplora_hf import KeepLoRAConfig, begin_task, end_task, learned_update, protected_basis
from keeplora_hf.tuner.weights import apply_delta_
from measure import RESULTS, configure_threads, ratio_summary, summary, write_result
from branch_step_time import install_finished_tasks
from setups import train_step

TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
ADAPTER = "default"
SEED = 0
TASKS = 2
FINISHED_TASK_COUNTS = (1, 4, 8)
PROBE_ROWS = 16  # random inputs per layer for the output check
GIB = 2**30
START = time.perf_counter()
#: per target, a task's `(lora_A, lora_B, scaling)` in float32
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- model, data, training --------------------------------------------------------------------------------------------


def llava_config(tiny: bool) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (ViT-L/14-336, Llama-2-7B, vocabulary 32064), or every one of them shrunk."""
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    else:
        vision = dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336
        )
        text = dict(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064
        )
    image_token = 250 if tiny else 32000
    return LlavaConfig(
        vision_config=CLIPVisionConfig(patch_size=14, projection_dim=vision["hidden_size"], **vision),
        text_config=LlamaConfig(
            num_key_value_heads=text["num_attention_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, **text,
        ),
        image_token_index=image_token,
        image_seq_length=(vision["image_size"] // 14) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_base(config: LlavaConfig, device: torch.device) -> nn.Module:
    """Random bfloat16 weights, initialised on `device`; the same seed gives the same weights."""
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model


def make_batches(
    count: int, seed: int, batch: int, tokens: int, config: LlavaConfig, device: torch.device
) -> list[dict]:
    """Text-only batches: token ids drawn uniformly below the image token, labels = input ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, config.image_token_index, (batch, tokens), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def current_factors(layers: dict[str, LoraLayer]) -> Factors:
    """Each target's `(A, B, scaling)` in float32: the task's update `scaling * B @ A`, read just before end_task."""
    return {
        name: (
            m.lora_A[ADAPTER].weight.detach().float().clone(),
            m.lora_B[ADAPTER].weight.detach().float().clone(),
            float(m.scaling[ADAPTER]),
        )
        for name, m in layers.items()
    }


def target_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters and buffers (the KeepLoRA state included) and of the optimizer's state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class Device:
    """Synchronized wall time and peak allocated memory of one call (memory only on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else f"CPU ({torch.get_num_threads()} thread(s))"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
        """`fn()` and `{"seconds", "peak_gib", "increase_gib"}`; the increase is over what was allocated before."""
        self.sync()
        before = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - start
        if not self.cuda:
            return out, {"seconds": seconds, "peak_gib": None, "increase_gib": None}
        peak = torch.cuda.max_memory_allocated(self.device)
        return out, {"seconds": seconds, "peak_gib": peak / GIB, "increase_gib": (peak - before) / GIB}

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


# -- 1. the training step ---------------------------------------------------------------------------------------------


def compare_steps(
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    data: list[dict],
    steps: int,
    dev: Device,
) -> dict:
    """One warm-up round, then `steps` rounds of one step per model in rotating order; time and memory per step."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    own_peaks: dict[str, list[float | None]] = {n: [] for n in names}
    for round_ in range(steps + 1):
        batch = data[round_ % len(data)]
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            _, m = dev.measure(lambda: train_step(models[name], batch, optimizers[name]))
            if round_:
                times[name].append(m["seconds"])
                resident = resident_bytes(models[name], optimizers[name]) / GIB
                own_peaks[name].append(None if m["increase_gib"] is None else resident + m["increase_gib"])
    out: dict[str, Any] = {}
    for name in names:
        peaks = [p for p in own_peaks[name] if p is not None]
        out[name] = {
            "seconds": summary(times[name]),
            "trainable_parameters": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
            "resident_gib": resident_bytes(models[name], optimizers[name]) / GIB,
            "own_peak_gib": statistics.median(peaks) if peaks else None,
        }
        median = out[name]["seconds"]["median"]
        log(f"step {name}: median {median * 1e3:.1f} ms, own peak {_gib(out[name]['own_peak_gib'])}")
    out["keeplora_over_lora"] = ratio_summary(times["keeplora"], times["lora"])
    if out["lora"]["own_peak_gib"]:
        out["keeplora_over_lora"]["own_peak"] = out["keeplora"]["own_peak_gib"] / out["lora"]["own_peak_gib"]
    return out


# -- 3. exactness -----------------------------------------------------------------------------------------------------


def _relative(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    scale = float(torch.linalg.norm(denominator))
    return float(torch.linalg.norm(numerator)) / scale if scale > 0 else None


def exactness(
    model: nn.Module,
    layers: dict[str, LoraLayer],
    history: list[Factors],
    protected: dict[str, torch.Tensor],
    seed: int,
) -> tuple[dict[str, list[float | None]], dict[str, torch.Tensor]]:
    """Per-layer metrics after the last task of `history`, and every target's weight as finished_tasks="merge" would
    have left it. `history` holds each finished task's `(A, B, scaling)` per layer; the run keeps them as a branch."""
    rows: dict[str, list[float | None]] = defaultdict(list)
    merged: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in layers.items():
            weight = module.get_base_layer().weight  # unchanged by a branch
            deltas = [task[name][2] * (task[name][1] @ task[name][0]) for task in history]
            delta, total = deltas[-1], torch.stack(deltas).sum(0)
            learned = learned_update(model, name)
            basis = protected[name].to(weight.device)
            rows["protected_fraction"].append(basis.shape[1] / basis.shape[0])
            rows["branch_learned_update_error"].append(_relative(learned - total, total))
            rows["branch_share_in_protected"].append(_relative(delta @ basis, delta))
            # finished_tasks="merge": each task added into the weight and rounded once, as end_task does
            before = weight.detach().clone()
            for earlier in deltas[:-1]:
                apply_delta_(before, earlier)
            after = before.clone()
            apply_delta_(after, delta)
            written = after.float() - before.float()
            rows["merge_lost_fraction"].append(_relative(written - delta, delta))
            rows["merge_share_in_protected"].append(_relative(written @ basis, written))
            # the layer's output change on random inputs against x @ learned.T (all tasks so far)
            x = torch.randn(PROBE_ROWS, weight.shape[1], generator=g).to(weight)
            expected = x.float() @ learned.T
            pretrained = F.linear(x, weight).float()
            ideal = (pretrained + expected).to(weight.dtype)  # the least error a bfloat16 output allows
            rows["branch_output_error"].append(_relative(module(x).float() - pretrained - expected, expected))
            rows["merge_output_error"].append(_relative(F.linear(x, after).float() - pretrained - expected, expected))
            rows["bf16_output_floor"].append(_relative(ideal.float() - pretrained - expected, expected))
            merged[name] = after
    return rows, merged


def logits_with_weights(
    model: nn.Module, layers: dict[str, LoraLayer], weights: dict[str, torch.Tensor], batch: dict
) -> torch.Tensor:
    """Logits with the targets' base weights swapped for `weights`, LoRA and the finished-task branch disabled."""
    originals = {}
    for name, weight in weights.items():
        param = layers[name].get_base_layer().weight
        originals[name], param.data = param.data, weight
    try:
        with model.disable_adapter():
            return logits(model, batch)
    finally:
        for name, data in originals.items():
            layers[name].get_base_layer().weight.data = data


def step_after_finished_tasks(
    config: LlavaConfig, device: torch.device, settings: dict, lora_settings: dict, data: list[dict], steps: int,
    dev: Device,
) -> dict:
    """The training step of a task begun after 1, 4 and 8 finished tasks (random rank-r updates, kept as the default
    config keeps them on this bfloat16 base: a frozen branch) against PEFT LoRA's step in the same rounds, without
    autocast (the branch in float32) and under bfloat16 autocast (the recipes' `bf16: true`; the branch in bfloat16
    with `A` split in two halves)."""
    models = {"lora": get_peft_model(build_base(config, device), LoraConfig(**lora_settings)),
              "keeplora": get_peft_model(build_base(config, device), KeepLoRAConfig(**settings))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        begin_task(models["keeplora"], data, max_batches=len(data))
    optimizers = {name: optimizer_for(model) for name, model in models.items()}
    out: dict = {}
    for count in FINISHED_TASK_COUNTS:
        install_finished_tasks(models["keeplora"], count, settings["r"], seed=count)
        out[count] = {}
        for mode in ("float32 branch", "bf16 autocast"):
            times: dict[str, list[float]] = {name: [] for name in models}
            for i in range(steps + 1):
                for name in (list(models) if i % 2 else list(models)[::-1]):
                    step = lambda: train_step(models[name], data[i % len(data)], optimizers[name],  # noqa: E731
                                              autocast=mode == "bf16 autocast")
                    seconds = dev.measure(step)[1]["seconds"]
                    if i:
                        times[name].append(seconds)
            out[count][mode] = {"seconds": summary(times["keeplora"]), "lora_seconds": summary(times["lora"]),
                                "over_lora": ratio_summary(times["keeplora"], times["lora"])}
            log(f"step after {count} finished tasks, {mode}: {out[count][mode]['seconds']['median'] * 1e3:.1f} ms, "
                f"{out[count][mode]['over_lora']['median']:.3f} x PEFT LoRA's")
    return out


def _spread(values: list[float | None]) -> dict[str, float] | None:
    kept = [v for v in values if v is not None]
    return {**summary(kept), "undefined": len(values) - len(kept)} if kept else None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -- the run ----------------------------------------------------------------------------------------------------------


def run(tiny: bool, batch: int, tokens: int, steps: int, task_batches: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; --tiny runs on the CPU")
    dev = Device(device)
    config = llava_config(tiny)
    rank, alpha = (8, 2) if tiny else (32, 8)
    lora_settings = dict(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS)
    keeplora_settings = dict(
        principal_energy=0.6, feature_energy=0.99, layer_scale_gamma=0.2, gradient_data_ratio=1.0, **lora_settings
    )
    log(f"{dev.name()}: {'tiny' if tiny else 'LLaVA-1.5-7B-shaped'} model, batch {batch} x {tokens} tokens")

    keep, build = dev.measure(lambda: get_peft_model(build_base(config, device), KeepLoRAConfig(**keeplora_settings)))
    layers = target_layers(keep)
    names = list(layers)
    parameters = sum(p.numel() for n, p in keep.named_parameters() if "lora_" not in n)
    log(f"KeepLoRA++ model built in {build['seconds']:.1f}s: {_count(parameters)} parameters, {len(names)} targets")
    probe = make_batches(1, 999, batch, tokens, config, device)[0]
    tasks = [make_batches(task_batches, 100 * (t + 1), batch, tokens, config, device) for t in range(TASKS)]

    step: dict = {}
    records: list[dict] = []
    history: list[Factors] = []
    for t, data in enumerate(tasks):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, begin = dev.measure(lambda: begin_task(keep, data, max_batches=len(data)))
        log(f"task {t + 1} begin_task: {begin['seconds']:.2f}s, peak {_gib(begin['peak_gib'])}")
        protected = {name: protected_basis(keep, name).detach().to("cpu", torch.float32, copy=True) for name in names}
        optimizer = optimizer_for(keep)
        if t == 0:  # the step comparison: a PEFT LoRA copy of the same model, trained side by side, then dropped
            lora = get_peft_model(build_base(config, device), LoraConfig(**lora_settings))
            models = {"lora": lora, "keeplora": keep}
            step = compare_steps(models, {"lora": optimizer_for(lora), "keeplora": optimizer}, data, steps, dev)
            del lora, models
            dev.free()
            train = step["keeplora"]["seconds"]
        else:
            seconds = [
                dev.measure(lambda: train_step(keep, data[i % len(data)], optimizer))[1]["seconds"]
                for i in range(steps + 1)
            ]
            train = summary(seconds[1:])
        history.append(current_factors(layers))
        before = logits(keep, probe)
        _, end = dev.measure(lambda: end_task(keep, data, max_batches=len(data)))
        log(f"task {t + 1} end_task: {end['seconds']:.2f}s, peak {_gib(end['peak_gib'])}")
        del optimizer
        after = logits(keep, probe)
        rows, merged = exactness(keep, layers, history, protected, seed=t)
        merged_logits = logits_with_weights(keep, layers, merged, probe)
        diff = {"branch": _max_abs(before, after), "merge": _max_abs(before, merged_logits)}
        del merged, merged_logits, protected
        dev.free()
        spread = {metric: _spread(values) for metric, values in rows.items()}
        records.append(
            {
                "task": t + 1,
                "begin_task": begin,
                "end_task": end,
                "step_seconds": train,
                "begin_task_warnings": [str(w.message)[:300] for w in caught],
                "logits_max_abs_diff_across_end_task": diff,
                "layers": spread,
                "per_layer": dict(rows),
            }
        )
        log(
            f"task {t + 1}: merge lost fraction {_range(spread['merge_lost_fraction'])} (min / median / max); "
            f"logits max abs diff across end_task: branch {diff['branch']:.3g}, merge {diff['merge']:.3g}"
        )

    with tempfile.TemporaryDirectory() as folder:
        _, save = dev.measure(lambda: keep.save_pretrained(folder))
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        log(f"save_pretrained: {save['seconds']:.2f}s, {size / GIB:.2f} GiB on disk")
        del keep, layers
        dev.free()
        base, rebuild = dev.measure(lambda: build_base(config, device))
        loaded, load = dev.measure(lambda: PeftModel.from_pretrained(base, folder))
        log(f"PeftModel.from_pretrained: {load['seconds']:.2f}s (the base rebuilt in {rebuild['seconds']:.1f}s)")
    reloaded = logits(loaded, probe)
    identical = bool(torch.equal(after, reloaded))
    round_trip = {
        "save": save,
        "adapter_gib_on_disk": size / GIB,
        "rebuild_base": rebuild,
        "load": load,
        "logits_max_abs_diff": _max_abs(after, reloaded),
        "bit_identical": identical,
    }
    log(f"save -> load: logits max abs diff {round_trip['logits_max_abs_diff']:.3g}, bit-identical: {identical}")
    del loaded, base
    dev.free()
    after_tasks = step_after_finished_tasks(config, device, keeplora_settings, lora_settings, tasks[0], steps, dev)
    dev.free()
    return {
        "device": dev.name(),
        "cuda": torch.version.cuda if dev.cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB if dev.cuda else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "model": {
            "shape": "tiny" if tiny else "llava-1.5-7b",
            "base_parameters": parameters,
            "dtype": "bfloat16",
            "targets": len(names),
            "target_names": names,
        },
        "batch": batch,
        "tokens": tokens,
        "steps_per_task": steps + 1,
        "task_batches": task_batches,
        "lora": lora_settings,
        "keeplora": keeplora_settings,
        "build_seconds": build["seconds"],
        "step": step,
        "tasks": records,
        "save_load": round_trip,
        "step_after_finished_tasks": after_tasks,
        "wall_seconds": time.perf_counter() - START,
    }


# -- the Markdown table -----------------------------------------------------------------------------------------------


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _range(spread: dict[str, float] | None) -> str:
    return "n/a" if spread is None else f"{_num(spread['min'])} / {_num(spread['median'])} / {_num(spread['max'])}"


def markdown(result: dict) -> str:
    """The result as the tables of results/GPU.md."""
    step, model = result["step"], result["model"]
    tiny, versions = model["shape"] == "tiny", result["versions"]
    lines = [
        f"# KeepLoRA++ on {'a tiny LLaVA' if tiny else 'a LLaVA-1.5-7B-shaped model'}: {result['device']}",
        "",
        f"Random bfloat16 weights ({_count(model['base_parameters'])} parameters), {model['targets']} targets, "
        f"batch {result['batch']} x {result['tokens']} text tokens, r = {result['lora']['r']}, alpha = "
        f"{result['lora']['lora_alpha']}; {result['steps_per_task']} AdamW steps and {result['task_batches']} "
        f"statistics batches per task. torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}; the run took {result['wall_seconds']:.0f} s after the imports. Written by "
        "`benchmarks/gpu.py`.",
        "",
        "## Training step (interleaved, after a warm-up step)",
        "",
        "| method | median | min - max | trainable parameters | own peak memory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in (("lora", "PEFT LoRA"), ("keeplora", "KeepLoRA++")):
        s = step[name]
        lines.append(
            f"| {label} | {s['seconds']['median'] * 1e3:.1f} ms | {s['seconds']['min'] * 1e3:.1f} - "
            f"{s['seconds']['max'] * 1e3:.1f} ms | {s['trainable_parameters']:,} | {_gib(s['own_peak_gib'])} |"
        )
    ratio = step["keeplora_over_lora"]
    lines += [
        "",
        f"KeepLoRA++ / LoRA: {ratio['median']:.3f} (median of per-round ratios), own peak memory "
        f"{_num(ratio.get('own_peak'))}. Own peak = the model's weights, buffers and optimizer state + the step's peak "
        "over what was allocated before it (both models were resident).",
        "",
        "## Task boundaries",
        "",
        "| task | begin_task | peak | end_task | peak | training step (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["tasks"]:
        lines.append(
            f"| {r['task']} | {r['begin_task']['seconds']:.2f} s | {_gib(r['begin_task']['peak_gib'])} | "
            f"{r['end_task']['seconds']:.2f} s | {_gib(r['end_task']['peak_gib'])} | "
            f"{r['step_seconds']['median'] * 1e3:.1f} ms |"
        )
    warned = [f"- task {r['task']}: {message}" for r in result["tasks"] for message in r["begin_task_warnings"]]
    if warned:
        lines += ["", "begin_task warned:", "", *warned]
    lines += [
        "",
        "## Exactness after each task (min / median / max over layers)",
        "",
        "`branch`: the run (`finished_tasks=\"auto\"` on a bfloat16 base). `merge`: each task's update added into the "
        "bfloat16 weight and rounded once, as `finished_tasks=\"merge\"` does, computed from the same updates. Lost "
        "fraction: `|(W_after - W_before) - dW| / |dW|` (0 by construction for the branch, which leaves W unchanged). "
        "Share in protected: `|dW P| / |dW|`, P = `protected_basis` at that task's begin_task. Output error: "
        "`|(layer(x) - W0 x) - learned x| / |learned x|` on random inputs; its floor is the pre-trained bfloat16 "
        "output plus the exact change, rounded once. Logits: max abs diff on a fixed batch just before vs just after "
        "end_task.",
        "",
        "| task | metric | branch | merge |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["tasks"]:
        m = r["layers"]
        logit = r["logits_max_abs_diff_across_end_task"]
        lines += [
            f"| {r['task']} | lost fraction | 0 | {_range(m['merge_lost_fraction'])} |",
            f"| {r['task']} | share in protected | {_range(m['branch_share_in_protected'])} | "
            f"{_range(m['merge_share_in_protected'])} |",
            f"| {r['task']} | output error (floor {_range(m['bf16_output_floor'])}) | "
            f"{_range(m['branch_output_error'])} | {_range(m['merge_output_error'])} |",
            f"| {r['task']} | learned_update vs sum of s B A | {_range(m['branch_learned_update_error'])} | |",
            f"| {r['task']} | logits max abs diff | {_num(logit['branch'])} | {_num(logit['merge'])} |",
            f"| {r['task']} | protected dimensions / d_in | {_range(m['protected_fraction'])} | |",
        ]
    rt = result["save_load"]
    lines += [
        "",
        "## Step after finished tasks (a frozen branch on the bfloat16 base), interleaved with PEFT LoRA's",
        "",
        "| finished tasks | forward | step (median) | ÷ PEFT LoRA step (median of rounds) |",
        "| ---: | --- | --- | ---: |",
        *[f"| {count} | {mode} | {m['seconds']['median'] * 1e3:.1f} ms | {m['over_lora']['median']:.3f} |"
          for count, modes in result["step_after_finished_tasks"].items() for mode, m in modes.items()],
    ]
    lines += [
        "",
        "## Save and load",
        "",
        "| save_pretrained | on disk | PeftModel.from_pretrained | logits max abs diff | bit-identical |",
        "| --- | --- | --- | --- | --- |",
        f"| {rt['save']['seconds']:.2f} s | {rt['adapter_gib_on_disk']:.3f} GiB | {rt['load']['seconds']:.2f} s "
        f"(base rebuilt in {rt['rebuild_base']['seconds']:.1f} s) | {_num(rt['logits_max_abs_diff'])} | "
        f"{rt['bit_identical']} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="shrink every shape; runs on the CPU without a GPU")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (4; tiny: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (640; tiny: 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per task, after one warm-up step")
    parser.add_argument("--task-batches", type=int, default=2, help="batches of begin_task's and end_task's passes")
    args = parser.parse_args()
    if min(args.steps, args.task_batches) < 1:
        parser.error("--steps and --task-batches must be at least 1")
    configure_threads()
    batch = args.batch or (2 if args.tiny else 4)
    tokens = args.tokens or (16 if args.tiny else 640)
    result = run(args.tiny, batch, tokens, args.steps, args.task_batches)
    tag = "tiny" if args.tiny else "llava-7b"
    path = write_result(f"gpu_{tag}", result)
    table = RESULTS / ("GPU_tiny.md" if args.tiny else "GPU.md")
    table.write_text(markdown(result))
    print(table.read_text())
    print(path, table, sep="\n")


if __name__ == "__main__":
    main()
