"""Goal 1: training-step time of KeepLoRA++ (frozen A, and trained A) over PEFT LoRA of the same rank and targets.

The three models are built from the same config and seed, trained on the same batch, and their steps interleaved
(LoRA, KeepLoRA, KeepLoRA+A, then rotated) for `--rounds` rounds after a warm-up round.
"""

from __future__ import annotations

import argparse

import torch

from measure import configure_threads, interleaved, ratio_summary, summary, write_result
from setups import RANK, batches, bench_model, lora, optimizer_for, ready_keeplora, train_step


def run(model_name: str, rounds: int) -> dict:
    bench = bench_model(model_name)
    data = batches(bench, 2)
    plain, _ = lora(model_name)
    frozen = ready_keeplora(model_name, data[:1])
    trained = ready_keeplora(model_name, data[:1], train_lora_A=True)
    optimizers = {
        "lora": optimizer_for(plain),
        "keeplora": optimizer_for(frozen),
        "keeplora_train_A": optimizer_for(trained, keeplora_trains_A=True),
    }
    models = {"lora": plain, "keeplora": frozen, "keeplora_train_A": trained}
    batch = data[1]
    times = interleaved({k: (lambda k=k: train_step(models[k], batch, optimizers[k])) for k in models}, rounds)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    return {
        "model": bench.description,
        "rank": RANK[model_name],
        "rounds": rounds,
        "seconds_per_step": {k: summary(v) for k, v in times.items()},
        "trainable_parameters": trainable,
        "ratio_keeplora_over_lora": ratio_summary(times["keeplora"], times["lora"]),
        "ratio_keeplora_train_A_over_lora": ratio_summary(times["keeplora_train_A"], times["lora"]),
        "goal": {"keeplora_over_lora": 1.00, "keeplora_train_A_over_lora": 1.10},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llava-100m")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    configure_threads(args.model)
    torch.manual_seed(0)
    result = run(args.model, args.rounds)
    path = write_result(f"step_time_{args.model}", result)
    print(path)


if __name__ == "__main__":
    main()
