"""Issue 28: the reference CLIP code's statistics against ours, side by side on a tiny CLIP continual sequence.

Variants (everything else the same, the MTIL recipe's settings scaled to the tiny CLIP: q, k, v, out_proj of both
towers, epsilon_w 0.85 vision / 0.2 text, epsilon_f 0.99, gamma 0.2, the whole task set for the statistics):

- `ours`: `principal_side="right"` (right singular vectors of each weight), `activation_statistic="second_moment"`;
- `reference principal side`: `principal_side="left"` (the reference CLIP code's `U[:, :p]` of `svd(W)`);
- `reference memory statistic`: `activation_statistic="position_mean"` (its position-aligned running mean);
- `reference, both`: the two together;
- `ours + heads (KeepLoRA++cls)`: ours with a cosine head per task (`keeplora_hf.tuner.heads`).

Each seed pre-trains its own tiny CLIP on half of a concept bank (`keeplora_hf.models.tiny_classification`), then
learns 4 tasks of 6 classes (3 pre-trained concepts, 3 new ones, each task through its own image style) in order;
after each task every task is evaluated (with its own head where the variant has heads). Transfer / Avg / Last are
ZSCL's (`keeplora_hf.continual.metrics`); the principal ranks p are the reference's count throughout.

    python benchmarks/clip_statistics.py     # ~2.5 min on one thread: results/clip_statistics.json and a table
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import get_peft_model

from keeplora_hf import KeepLoRAConfig, begin_task, end_task
from keeplora_hf.continual.metrics import avg, last, transfer
from keeplora_hf.data import clip_classification_loss
from keeplora_hf.models import build_tiny
from keeplora_hf.models.tiny_classification import ConceptBank, TinyClassificationTask, pretrain_tiny_clip
from keeplora_hf.recipes.adapter import seed_principal_energy
from keeplora_hf.tuner.heads import add_task_head, task_head, task_heads
from measure import configure_threads, write_result

VARIANTS = {
    "ours": {},
    "reference principal side": {"principal_side": "left"},
    "reference memory statistic": {"activation_statistic": "position_mean"},
    "reference, both": {"principal_side": "left", "activation_statistic": "position_mean"},
    "ours + heads (KeepLoRA++cls)": {"heads": True},
}
TARGETS = r"(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
TEXT_ENERGY = {r"text_model\.": 0.2}
TASKS, CLASSES, KNOWN = 4, 6, 16
METRICS = ("transfer", "avg", "last")


def sequence(seed: int) -> tuple[torch.nn.Module, list[TinyClassificationTask]]:
    """A tiny CLIP pre-trained on concepts 0..15 of the seed's bank, and 4 tasks of 3 known + 3 new concepts."""
    bank = ConceptBank(2 * KNOWN, seed=seed)
    model = build_tiny("clip", seed=seed).model
    pretrain_tiny_clip(model, bank, range(KNOWN), seed=seed)
    half = CLASSES // 2
    tasks = [
        bank.task(f"task{t}", [*range(half * t, half * (t + 1)), *range(KNOWN + half * t, KNOWN + half * (t + 1))],
                  seed=1000 * seed + t)
        for t in range(TASKS)
    ]
    return model, tasks


def accuracy(model: torch.nn.Module, task: TinyClassificationTask, heads: bool) -> float:
    correct = total = 0
    with torch.no_grad(), task_head(model, task.name if heads else None):
        for batch in task.eval:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits_per_image
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


def run_variant(base: torch.nn.Module, tasks: list[TinyClassificationTask], options: dict, args) -> dict:
    options = dict(options)
    heads = options.pop("heads", False)
    config = KeepLoRAConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, principal_energy=0.85,
                            feature_energy=0.99, layer_scale_gamma=0.2, gradient_data_ratio=1.0, **options)
    model = get_peft_model(copy.deepcopy(base), config)
    seed_principal_energy(model, TEXT_ENERGY)
    rows = [[accuracy(model, task, heads) for task in tasks]]
    for task in tasks:
        begin_task(model, task.train, loss_fn=clip_classification_loss)
        if heads:
            add_task_head(model, task.name, task.train)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
        model.train()
        for _ in range(args.epochs):
            for batch in task.train:
                clip_classification_loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad()
        end_task(model, task.train, loss_fn=clip_classification_loss)
        if heads:
            task_heads(model).active = None
        rows.append([accuracy(model, t, heads) for t in tasks])
    states = [m.keeplora_state["default"] for m in model.modules() if hasattr(m, "keeplora_state")]
    return {"matrix": rows, "transfer": transfer(rows), "avg": avg(rows), "last": last(rows),
            "mean_p": statistics.mean(s.principal_rank for s in states),
            "mean_m": statistics.mean(s.memory_rank for s in states)}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _summary(results: list[dict], ours: list[dict]) -> dict:
    """Mean and spread over seeds of each metric, and of its paired difference from `ours` (the same seed's base and
    tasks), with the mean ranks."""
    row: dict = {}
    for k in METRICS:
        deltas = [r[k] - o[k] for r, o in zip(results, ours)]
        values = [r[k] for r in results]
        row[k] = {"mean": statistics.mean(values), "sd": _sd(values),
                  "delta": statistics.mean(deltas), "delta_sd": _sd(deltas)}
    row["mean_p"] = statistics.mean(r["mean_p"] for r in results)
    row["mean_m"] = statistics.mean(r["mean_m"] for r in results)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)
    args = parser.parse_args()
    configure_threads()
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        base, tasks = sequence(seed)
        for name, options in VARIANTS.items():
            torch.manual_seed(seed)
            runs[name].append(run_variant(base, tasks, options, args))
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {100 * runs[name][-1][k]:.1f}" for k in METRICS))
    table = {name: _summary(results, runs["ours"]) for name, results in runs.items()}
    print("\n| variant | Transfer | Avg | Last | Δ Transfer | Δ Avg | Δ Last | mean p | mean m |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in table.items():
        cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['sd']:.1f}" for k in METRICS]
        cells += [f"{100 * row[k]['delta']:+.1f} ± {100 * row[k]['delta_sd']:.1f}" for k in METRICS]
        cells += [f"{row['mean_p']:.1f}", f"{row['mean_m']:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    write_result("clip_statistics", {
        "settings": {**vars(args), "tasks": TASKS, "classes": CLASSES, "pretrained_concepts": KNOWN, "targets": TARGETS,
                     "principal_energy": {"vision": 0.85, "text": 0.2}, "feature_energy": 0.99, "gamma": 0.2},
        "variants": {name: {k: v for k, v in VARIANTS[name].items()} for name in VARIANTS},
        "table": table, "runs": runs, "seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
