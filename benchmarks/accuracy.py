"""Goal 6: the approximations leave KeepLoRA++'s results where the exact computations put them.

Two parts, both comparing the default (fast) configuration with the exact one in the same run:

1. `sequence`: a three-task continual sequence on the tiny LLaVA (each task maps question tokens to answers by its
   own rule; the rules share tokens, so learning one disturbs the others), for several seeds. The accuracy matrix
   gives MFN (final mean accuracy), MAA, BWT and forgetting; the fast path must stay within the exact path's
   seed-to-seed spread. A third configuration narrows the gradient sketch below the tiny model's width
   (`sketch_oversampling=4`, 8 rows for 32-wide outputs), so the sketch is an approximation there too.
2. `layers`: per-layer agreement on the ~100M LLaVA, on real gradients and features of one task: the residual-gradient
   energy that the sketched `A` captures relative to the exact SVD's `A`, the principal subspaces of the Gram solver
   against the float64 SVD, and the feature-memory directions of the randomized solver against `eigh`.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import numpy as np
import torch
from peft import get_peft_model

from keeplora_hf import KeepLoRAConfig, attach_residual_projection, begin_task, end_task
from keeplora_hf.continual.metrics import compute_all
from keeplora_hf.models import build_tiny
from keeplora_hf.tuner.statistics import default_loss, input_feature_pass, output_gradient_pass, weight_gradient_pass
from keeplora_hf.subspace import FeatureStatistics, GradientSketch, Subspace, memory_directions, principal_basis
from keeplora_hf.subspace import residual_directions
from keeplora_hf.tuner.context import task_context
from measure import configure_threads, write_result
from setups import RANK, batches, keeplora

EXACT = {"gradient_estimator": "exact", "principal_solver": "svd", "memory_solver": "eigh"}
SEQUENCE_CONFIGS = {"exact": EXACT, "fast": {}, "fast-narrow-sketch": {"sketch_oversampling": 4}}
QUESTIONS = list(range(10, 22))
ANSWERS = 40


def _rule_samples(tiny, rule: int, count: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batch = tiny.make_batch(count, seed)
    ids = batch["input_ids"].clone()
    questions = torch.tensor(QUESTIONS)[torch.randint(len(QUESTIONS), (count,), generator=g)]
    ids[:, -2] = questions
    ids[:, -1] = ANSWERS + (questions * (rule + 1)) % 8
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {**batch, "input_ids": ids, "labels": labels}


def _split(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _accuracy(model, data: dict) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**data).logits[:, -2]
    return float((logits.argmax(-1) == data["input_ids"][:, -1]).float().mean())


def sequence(seeds: int, tasks: int, steps: int) -> dict:
    results: dict[str, list[dict]] = {c: [] for c in SEQUENCE_CONFIGS}
    for seed in range(seeds):
        tiny_data = build_tiny("llava", seed)
        train = [_split(_rule_samples(tiny_data, r, 64, 10 + r + 100 * seed), 8) for r in range(tasks)]
        test = [_rule_samples(tiny_data, r, 64, 500 + r + 100 * seed) for r in range(tasks)]
        for config_name, overrides in SEQUENCE_CONFIGS.items():
            tiny = build_tiny("llava", seed)
            settings = dict(r=4, lora_alpha=8, target_modules=tiny.language_targets, principal_energy=0.3,
                            feature_energy=0.9, gradient_data_ratio=0.25, train_lora_A=False)
            model = get_peft_model(tiny.model, KeepLoRAConfig(**settings, **overrides))
            R = np.full((tasks + 1, tasks), np.nan)
            R[0] = [_accuracy(model, t) for t in test]
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in range(tasks):
                    begin_task(model, train[t])
                    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
                    attach_residual_projection(optimizer, model)
                    model.train()
                    for step in range(steps):
                        model(**train[t][step % len(train[t])]).loss.backward()
                        optimizer.step()
                        optimizer.zero_grad()
                    end_task(model, train[t])
                    R[t + 1] = [_accuracy(model, d) for d in test]
            metrics = {k: float(v) for k, v in compute_all(R).items() if k in ("mfn", "maa", "bwt", "forgetting", "mft")}
            results[config_name].append({"seed": seed, "accuracy_matrix": R.tolist(), **metrics})
            print(config_name, seed, metrics, flush=True)
    summary = {}
    for name, rows in results.items():
        summary[name] = {m: {"mean": statistics.mean(r[m] for r in rows), "stdev": statistics.pstdev(r[m] for r in rows)}
                         for m in ("mfn", "maa", "bwt", "forgetting", "mft")}
    differences = {}
    for name in SEQUENCE_CONFIGS:
        if name == "exact":
            continue
        differences[name] = {
            m: {
                "mean_difference": statistics.mean(a[m] - b[m] for a, b in zip(results[name], results["exact"])),
                "exact_seed_stdev": summary["exact"][m]["stdev"],
            }
            for m in ("mfn", "maa", "bwt", "forgetting")
        }
    return {"seeds": seeds, "tasks": tasks, "steps_per_task": steps, "runs": results, "summary": summary,
            "fast_minus_exact": differences}


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "p10": ordered[len(ordered) // 10], "median": statistics.median(ordered), "max": ordered[-1]}


def layers(model_name: str, statistics_batches: int) -> dict:
    model, bench = keeplora(model_name)
    data = batches(bench, statistics_batches)
    targets = task_context(model).layers
    rank = RANK[model_name]
    principal_rows, gradient_rows, memory_rows = [], [], []
    subspaces = {}
    for name, module in targets.items():
        weight = module.get_base_layer().weight
        fast = principal_basis(weight, 0.6, solver="gram")
        exact = principal_basis(weight, 0.6, solver="svd")
        energy = lambda b: float((weight.double() @ b).square().sum())  # noqa: E731
        cosines = torch.linalg.svdvals(exact.T @ fast) if fast.shape[1] and exact.shape[1] else torch.ones(1)
        principal_rows.append({"layer": name, "p_gram": fast.shape[1], "p_svd": exact.shape[1],
                               "energy_relative_difference": abs(energy(fast) - energy(exact)) / energy(exact),
                               "largest_angle_rad": float(torch.arccos(cosines.min().clamp(-1, 1)))})
        subspaces[name] = Subspace.of(exact.float())
    gradients: dict[str, torch.Tensor] = {}
    weight_gradient_pass(model, targets, data, default_loss,
                         lambda n, g: gradients.__setitem__(n, gradients[n] + g if n in gradients else g.clone()),
                         description="exact gradients")
    sketches = {n: GradientSketch(m.get_base_layer().out_features, m.get_base_layer().in_features, rank, 64, seed=i)
                for i, (n, m) in enumerate(targets.items())}
    output_gradient_pass(model, targets, data, default_loss, lambda n, x, g: sketches[n].update(x, g),
                         description="sketched gradients")
    for name in targets:
        gradient = gradients.pop(name).double()
        protected = subspaces[name]
        residual = protected.project_out(gradient)
        exact_rows = residual_directions(gradient, protected, rank)
        sketch_rows = sketches.pop(name).residual_directions(protected, rank)
        captured = lambda rows: float((residual @ rows.T).square().sum())  # noqa: E731
        total = float(residual.square().sum())
        gradient_rows.append({"layer": name, "captured_ratio": captured(sketch_rows) / captured(exact_rows),
                              "exact_top_r_fraction": captured(exact_rows) / total})
    stats = {n: FeatureStatistics(m.get_base_layer().in_features) for n, m in targets.items()}
    _, shared = input_feature_pass(model, targets, data, default_loss, lambda names, x: stats[names[0]].update(x), description="")
    for index, name in enumerate(targets):
        covariance = stats[shared.get(name, name)].covariance
        protected = subspaces[name]
        exact_new = memory_directions(covariance, protected, 0.99, solver="eigh")
        fast_new = memory_directions(covariance.float(), protected, 0.99, solver="randomized", seed=index).double()
        total = float(torch.trace(covariance))
        residual = protected.project_out(protected.project_out(covariance).T)
        explained = lambda new: (total - float(torch.trace(residual)) + float(torch.trace(new.T @ covariance @ new))) / total  # noqa: E731
        memory_rows.append({"layer": name, "count_eigh": exact_new.shape[1], "count_randomized": fast_new.shape[1],
                            "explained_eigh": explained(exact_new), "explained_randomized": explained(fast_new)})
    return {
        "model": bench.description,
        "statistics_batches": statistics_batches,
        "principal": {"layers": principal_rows,
                      "same_p": sum(r["p_gram"] == r["p_svd"] for r in principal_rows),
                      "largest_angle_rad": _quantiles([r["largest_angle_rad"] for r in principal_rows]),
                      "energy_relative_difference": _quantiles([r["energy_relative_difference"] for r in principal_rows])},
        "gradient_sketch": {"layers": gradient_rows, "rows": rank + 64,
                            "captured_ratio": _quantiles([r["captured_ratio"] for r in gradient_rows]),
                            "exact_top_r_fraction": _quantiles([r["exact_top_r_fraction"] for r in gradient_rows])},
        "memory": {"layers": memory_rows,
                   "extra_directions": _quantiles([r["count_randomized"] - r["count_eigh"] for r in memory_rows]),
                   "count_eigh_total": sum(r["count_eigh"] for r in memory_rows),
                   "count_randomized_total": sum(r["count_randomized"] for r in memory_rows),
                   "min_explained_randomized": min(r["explained_randomized"] for r in memory_rows)},
        "layer_count": len(principal_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["sequence", "layers", "both"], default="both")
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    out = {}
    if args.part in ("sequence", "both"):
        configure_threads("tiny-llava")
        out["sequence"] = sequence(args.seeds, args.tasks, args.steps)
        print(write_result("accuracy_sequence", out["sequence"]))
    if args.part in ("layers", "both"):
        configure_threads(args.model)
        out["layers"] = layers(args.model, args.batches)
        print(write_result(f"accuracy_layers_{args.model}", out["layers"]))


if __name__ == "__main__":
    main()
