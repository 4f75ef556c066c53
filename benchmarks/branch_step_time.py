"""Step time after 1 / 4 / 8 finished tasks against PEFT LoRA, and the ways to apply finished tasks, side by side.

Two parts, each interleaved in one process (see measure.py):

- `model`: a training step of PEFT LoRA and of KeepLoRA++ with the default config (`finished_tasks="auto"`: merged into a
  float32 weight, a frozen branch on a bfloat16 one) after 0, 1, 4 and 8 finished tasks, on `llava-7bp-bf16`
  (bfloat16; without autocast, the branch in float32, and under bfloat16 autocast, the recipes' setting, the split
  branch) and `llava-100m` (float32); the finished tasks are random rank-r updates installed as `end_task` leaves
  them, so the step measures their cost alone.
- `layer`: forward + backward of one bfloat16 layer (d_in 512, d_out 1408, 320 tokens) with 8 finished tasks applied
  each way considered: merged into the weight (no branch: the floor), the float32 branch added to a float32 copy of
  the base output (before), the float32 branch taking the base output in place (outside autocast, now), bfloat16
  operands with the sum in bfloat16, bfloat16 operands with `A` split as `A_hi + A_lo` (two bfloat16 halves, the sum
  in float32) added to a float32 copy of the output, and the same split accumulated into the bfloat16 base output by
  one `addmm` (the library's `FrozenBranch` under a 16-bit autocast, now).
  `leak` is the share of the applied update inside the protected subspace the tasks' `A` avoid
  (`||Delta P|| / ||Delta||`; the guarantee's bound is 1e-4).

- `branch_macs_llava_1.5_7b`: the branch's multiply-adds over the decoder projections' at LLaVA-1.5-7B's shapes
  (r = 32), float32 and split under autocast: arithmetic, not a timing (`--cost-only` prints it alone).

    python benchmarks/branch_step_time.py [--rounds 7] [--rank 16] [--cost-only]

At width 512, r = 16 makes eight tasks' stacked rank a quarter of the layer's width; `--rank 4` gives the share that
LLaVA-1.5-7B's r = 32 has at width 4096 (`results/branch_step_time_r4.json`).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from keeplora_hf.tuner.finished import FinishedTask, FrozenBranch, split_factors
from keeplora_hf.tuner.layer import layer_state
from keeplora_hf.tuner.lifecycle import _merges
from measure import configure_threads, interleaved, ratio_summary, summary, write_result
from setups import batches, lora, optimizer_for, ready_keeplora, train_step

TASKS = (0, 1, 4, 8)
#: LLaVA-1.5-7B's decoder projections per layer: (d_in, d_out, how many)
LLAVA_7B_PROJECTIONS = {"q, k, v, o": (4096, 4096, 4), "gate, up": (4096, 11008, 2), "down": (11008, 4096, 1)}


def branch_macs(rank: int = 32, counts: tuple[int, ...] = (1, 4, 8)) -> dict:
    """Multiply-adds per token of the finished tasks' branch over the decoder projections' own, at LLaVA-1.5-7B's
    shapes: float32 (`R (d_in + d_out)`, off a GPU's 16-bit tensor cores) and the split branch under 16-bit autocast
    (`R (2 d_in + d_out)`, on them), `R = tasks x rank`. What the step adds is this share of the projections' work."""
    base = sum(n * d_in * d_out for d_in, d_out, n in LLAVA_7B_PROJECTIONS.values())
    out = {}
    for count in counts:
        total = count * rank
        float32 = sum(n * total * (d_in + d_out) for d_in, d_out, n in LLAVA_7B_PROJECTIONS.values())
        split = sum(n * total * (2 * d_in + d_out) for d_in, d_out, n in LLAVA_7B_PROJECTIONS.values())
        out[count] = {"float32_branch": float32 / base, "split_branch_16bit": split / base}
    return out


def install_finished_tasks(model: torch.nn.Module, count: int, rank: int, seed: int) -> None:
    """`count` random finished tasks on every target (replacing any), merged or branched as the config's
    `finished_tasks` decides, on the layer's device."""
    g = torch.Generator().manual_seed(seed)
    config = model.peft_config["default"]
    for name, module in ((n, m) for n, m in model.named_modules() if hasattr(m, "keeplora_state")):
        base, state = module.get_base_layer(), layer_state(module, "default")
        device = base.weight.device
        tasks = []
        for _ in range(count):
            a = torch.linalg.qr(torch.randn(base.in_features, rank, generator=g))[0].T.contiguous()
            b = torch.randn(base.out_features, rank, generator=g) * 1e-2
            tasks.append(FinishedTask(a.to(device), b.to(device), 0.25))
        state.tasks = tasks
        if count and _merges(config, module, name):
            state.merge_into_base_(module)


def model_steps(model_name: str, rank: int, rounds: int, autocast: bool = False) -> dict:
    plain, bench = lora(model_name, rank=rank)
    data = batches(bench, 2)
    models, optimizers = {"lora": plain}, {"lora": optimizer_for(plain)}
    for count in TASKS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ready_keeplora(model_name, data[:1], r=rank)
        install_finished_tasks(model, count, rank, seed=count)
        models[f"keeplora_{count}_tasks"], optimizers[f"keeplora_{count}_tasks"] = model, optimizer_for(model)
    steps = {k: (lambda k=k: train_step(models[k], data[1], optimizers[k], autocast=autocast)) for k in models}
    times = interleaved(steps, rounds)
    return {
        "model": bench.description,
        "rank": rank,
        "autocast": "bfloat16" if autocast else None,
        "seconds_per_step": {k: summary(v) for k, v in times.items()},
        "ratio_over_lora": {k: ratio_summary(v, times["lora"]) for k, v in times.items() if k != "lora"},
    }


def layer_options(rank: int, rounds: int, tasks: int = 8, d_in: int = 512, d_out: int = 1408, tokens: int = 320) -> dict:
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(bf16)
    protected = torch.linalg.qr(torch.randn(d_in, d_in // 2, generator=g))[0]  # what the tasks' A avoid
    a = torch.randn(tasks * rank, d_in, generator=g)
    a = a - (a @ protected) @ protected.T
    b = torch.randn(d_out, tasks * rank, generator=g) * 1e-2
    scale = 0.25
    a16, b16 = a.to(bf16), b.to(bf16)
    halves = split_factors(a, b, bf16)[0]  # A_hi over A_lo, as the library's branch under autocast
    rank = a.shape[0]
    x = torch.randn(tokens, d_in, generator=g).to(bf16).requires_grad_(True)
    merged_weight = (weight.float() + scale * b @ a).to(bf16)

    def before() -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight)
        branch = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b) * scale
        return (out.float() + branch).to(bf16)

    def now() -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight)
        branch = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b).mul_(scale)
        return branch.add_(out).to(bf16)

    def bf16_operands() -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight)
        return out + torch.nn.functional.linear(torch.nn.functional.linear(x, a16), b16) * scale

    def bf16_split_a() -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight)
        both = torch.nn.functional.linear(x, halves)
        branch = torch.nn.functional.linear(both[:, :rank] + both[:, rank:], b16).float().mul_(scale)
        return branch.add_(out).to(bf16)

    library = FrozenBranch(a, b, [rank], [scale])

    def bf16_split_a_fused() -> torch.Tensor:
        with torch.autocast("cpu", dtype=bf16):
            return library(x, torch.nn.functional.linear(x, weight))

    def merged() -> torch.Tensor:
        return torch.nn.functional.linear(x, merged_weight)

    options = {"merged": merged, "float32_copy_before": before, "float32_in_place_now": now,
               "bf16_operands": bf16_operands, "bf16_split_A": bf16_split_a,
               "bf16_split_A_fused_now": bf16_split_a_fused}
    grad = torch.randn(tokens, d_out, generator=g).to(bf16)

    def step(fn):
        def run() -> None:
            fn().backward(grad)
            x.grad = None
        return run

    times = interleaved({k: step(fn) for k, fn in options.items()}, rounds * 5)
    delta16 = scale * b16.double() @ a16.double()
    split = scale * b16.double() @ (halves[:rank].double() + halves[rank:].double())
    delta = scale * b.double() @ a.double()
    fused = library.applied_update(bf16)
    p = protected.double()
    with torch.no_grad():
        gap_now_before = float((now() - before()).abs().max())
    return {
        "shape": {"d_in": d_in, "d_out": d_out, "tokens": tokens, "tasks": tasks, "rank": rank},
        "seconds": {k: summary(v) for k, v in times.items()},
        "ratio_over_merged": {k: ratio_summary(v, times["merged"]) for k, v in times.items() if k != "merged"},
        "leak": {
            "float32": float((delta @ p).norm() / delta.norm()),
            "bf16_operands": float((delta16 @ p).norm() / delta16.norm()),
            "bf16_split_A": float((split @ p).norm() / split.norm()),
            "bf16_split_A_fused_now": float((fused @ p).norm() / fused.norm()),
        },
        "max_output_gap_now_vs_before": gap_now_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["llava-7bp-bf16", "llava-100m"])
    parser.add_argument("--autocast-models", nargs="*", default=["llava-7bp-bf16"],
                        help="models measured again under bfloat16 autocast")
    parser.add_argument("--cost-only", action="store_true", help="only the multiply-add shares at LLaVA-1.5-7B shapes")
    args = parser.parse_args()
    if args.cost_only:
        print(branch_macs())
        return
    configure_threads()
    result = {
        "branch_macs_llava_1.5_7b": branch_macs(),
        "layer": layer_options(args.rank, args.rounds),
        "model": {name: model_steps(name, args.rank, args.rounds) for name in args.models},
        "model_bf16_autocast": {name: model_steps(name, args.rank, args.rounds, True) for name in args.autocast_models},
    }
    print(write_result("branch_step_time" if args.rank == 16 else f"branch_step_time_r{args.rank}", result))


if __name__ == "__main__":
    main()
