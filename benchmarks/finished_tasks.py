"""Where finished tasks live on a bfloat16 base: fidelity, protection and step time after 1, 4 and 8 tasks.

Options, side by side on the same weights and updates:

- `merge`: each task's float32 update `s B A` is added into the bfloat16 weight at end_task (one rounding per task,
  accumulating);
- `merge_master`: a float32 master copy of the weight receives every update, the bfloat16 weight is re-rounded from
  it after each task (one rounding in all, +2 bytes x weight per target of memory);
- `consolidate_4`: a frozen float32 branch of the pending tasks, folded into the master copy every 4 tasks;
- `branch_bf16`: a frozen branch with `A`, `B` rounded to bfloat16 and computed in bfloat16;
- `branch` (the library's choice for non-float32 bases): a frozen float32 branch, nothing written into the weight.

Fidelity and protection are measured on one layer of a pre-trained-like spectrum (`--width`, bfloat16), with updates
inside the residual of its principal subspace (epsilon_w 0.6) whose entries are 0.2-0.9 of a bfloat16 rounding step of
the weight, as measured on the 7B-shaped model (see the hardware issue): the "lost" share of what was learned
(`|effective - sum s B A| / |sum s B A|`), the share of the written change inside the protected subspace, and the
output change on protected inputs over that on random inputs (the layer run in bfloat16, the way it serves).

Step time: the real library on `--model` (float32, where bfloat16 matrix products are pathologically slow on CPUs),
a KeepLoRA++ training step with k finished tasks kept as the branch, interleaved with PEFT LoRA of the same rank
(merging costs a LoRA step: nothing is added to the forward).
"""

from __future__ import annotations

import argparse

import torch

from keeplora_hf.subspace import Subspace, principal_basis
from keeplora_hf.tuner.layer import layer_state
from keeplora_hf.tuner.finished import FinishedTask
from measure import configure_threads, interleaved, ratio_summary, summary, write_result
from setups import RANK, batches, lora, optimizer_for, ready_keeplora, train_step

BF16 = torch.bfloat16
OPTIONS = ("merge", "merge_master", "consolidate_4", "branch_bf16", "branch")
CHECKPOINTS = (1, 4, 8)


def _pretrained_like(width: int, g: torch.Generator) -> torch.Tensor:
    """A square weight with a decaying spectrum and entries of ~0.02, like a pre-trained projection."""
    u, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    singular = torch.arange(1, width + 1, dtype=torch.float64) ** -0.7
    weight = (u * singular) @ v.T
    return (weight * 0.02 / weight.std()).to(BF16)


def _updates(weight: torch.Tensor, protected: Subspace, tasks: int, rank: int, g: torch.Generator) -> list[FinishedTask]:
    """Rank-r updates in the residual whose entries are 0.2-0.9 of the weight's bfloat16 rounding step."""
    step = (weight.float().abs() * torch.finfo(BF16).eps).median().item()
    out = []
    for _ in range(tasks):
        rows = protected.project_out(torch.randn(rank, weight.shape[1], generator=g, dtype=torch.float64))
        lora_A = torch.linalg.qr(rows.T)[0].T.float()
        lora_B = torch.randn(weight.shape[0], rank, generator=g)
        delta = lora_B @ lora_A
        size = 0.2 + 0.7 * torch.rand((), generator=g).item()
        out.append(FinishedTask(lora_A, lora_B, size * step / delta.abs().median().item()))
    return out


def _effective(option: str, weight: torch.Tensor, tasks: list[FinishedTask]) -> tuple[torch.Tensor, torch.Tensor]:
    """(bfloat16 weight as stored, float32 update the layer applies beyond the original weight)."""
    original = weight.float()
    if option == "branch":
        return weight, sum(t.delta() for t in tasks)
    if option == "branch_bf16":
        return weight, sum((t.scaling * t.lora_B.to(BF16).float()) @ t.lora_A.to(BF16).float() for t in tasks)
    if option == "merge":
        stored = weight
        for task in tasks:
            stored = (stored.float() + task.delta()).to(BF16)
        return stored, stored.float() - original
    folded = len(tasks) if option == "merge_master" else 4 * (len(tasks) // 4)
    master = original + sum((t.delta() for t in tasks[:folded]), torch.zeros_like(original))
    stored = master.to(BF16)
    pending = sum((t.delta() for t in tasks[folded:]), torch.zeros_like(original))
    return stored, stored.float() - original + pending


def _layer_output(option: str, stored: torch.Tensor, tasks: list[FinishedTask], x: torch.Tensor) -> torch.Tensor:
    """The layer's bfloat16 output as each option serves it."""
    if option in ("merge", "merge_master"):
        return x @ stored.T
    if option == "branch_bf16":
        out = x @ stored.T
        for task in tasks:
            out = out + (x @ task.lora_A.to(BF16).T) @ (task.scaling * task.lora_B).to(BF16).T
        return out
    pending = tasks if option == "branch" else tasks[4 * (len(tasks) // 4) :]
    branch = sum(((x.float() @ t.lora_A.T) @ t.lora_B.T * t.scaling for t in pending), torch.zeros(()))
    return (x @ stored.T).float().add(branch).to(BF16)


def fidelity(width: int, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = _pretrained_like(width, g)
    basis = principal_basis(weight, 0.6, solver="svd")
    protected = Subspace(basis, complement=False)
    tasks = _updates(weight, protected, max(CHECKPOINTS), rank, g)
    inside_x = (torch.randn(64, basis.shape[1], generator=g, dtype=torch.float64) @ basis.T).to(BF16)
    random_x = torch.randn(64, width, generator=g).to(BF16) * (inside_x.float().norm() / (64 * width) ** 0.5).item()
    out = {}
    for option in OPTIONS:
        rows = {}
        for count in CHECKPOINTS:
            learned = sum(t.delta() for t in tasks[:count])
            stored, effective = _effective(option, weight, tasks[:count])
            moved = {}
            for kind, x in (("inside", inside_x), ("random", random_x)):
                change = _layer_output(option, stored, tasks[:count], x).float() - (x @ weight.T).float()
                moved[kind] = change.abs().mean().item()
            rows[count] = {
                "lost": ((effective - learned).norm() / learned.norm()).item(),
                "inside_share": (protected.project_onto(effective.double()).norm() / effective.norm()).item(),
                "output_moved_inside_over_random": moved["inside"] / moved["random"],
            }
        out[option] = rows
    return out


def step_time(model_name: str, rounds: int) -> dict:
    """KeepLoRA++ steps with k finished tasks as a float32 branch, interleaved with PEFT LoRA steps."""
    plain, bench = lora(model_name)
    data = batches(bench, 2)
    models, optimizers = {"lora": plain}, {"lora": optimizer_for(plain)}
    for count in CHECKPOINTS:
        model = ready_keeplora(model_name, data[:1], finished_tasks="branch")
        g = torch.Generator().manual_seed(count)
        for module in (m for m in model.modules() if hasattr(m, "keeplora_state")):
            base = module.get_base_layer()
            state = layer_state(module, "default")
            state.tasks = [
                FinishedTask(torch.randn(RANK[model_name], base.in_features, generator=g) * 1e-2,
                             torch.randn(base.out_features, RANK[model_name], generator=g) * 1e-2, 0.25)
                for _ in range(count)
            ]
        models[f"branch_{count}"], optimizers[f"branch_{count}"] = model, optimizer_for(model)
    times = interleaved({k: (lambda k=k: train_step(models[k], data[1], optimizers[k])) for k in models}, rounds)
    return {
        "model": bench.description,
        "rank": RANK[model_name],
        "seconds_per_step": {k: summary(v) for k, v in times.items()},
        "ratio_over_lora": {k: ratio_summary(v, times["lora"]) for k, v in times.items() if k != "lora"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_threads(args.model)
    result = {
        "fidelity": {"width": args.width, "rank": args.rank, "by_option": fidelity(args.width, args.rank, args.seed)},
        "step_time": step_time(args.model, args.rounds),
    }
    print(write_result(f"finished_tasks_{args.model}", result))


if __name__ == "__main__":
    main()
