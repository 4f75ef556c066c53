"""KeepLoRA++ under DeepSpeed ZeRO through the Trainer (`TrainingArguments(deepspeed=...)`, the path `accelerate launch`
with a DeepSpeed config takes), on two CPU processes (torchrun, gloo, DeepSpeed's CPU accelerator).

ZeRO-3 partitions every weight, `A` and `B` included: the principal bases, `A` and the merges go through
`keeplora_hf.sharding` (gathered one layer at a time, written back with the optimizer's float32 copy). ZeRO-2 keeps
whole weights but its own float32 copy of `B`. Both must learn what one process learns, keep `A P = 0` on every rank,
and resume a task killed mid-way to the same matrix.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapter_updates import task_updates
from test_resume import SCRIPT, matrix, residuals

pytestmark = pytest.mark.slow

# stated tolerances: float32 accuracies within one eval sample of 16 as the DDP test; task updates within 1e-2 relative,
# where DDP's are within 1e-3: DeepSpeed's own gradient clipping (max_grad_norm 1.0, reached on some steps of this
# sequence) does not reproduce torch's to the last bit (measured: ZeRO-2 / ZeRO-3 / ZeRO-3 with trained A 4.1e-3 /
# 3.0e-3 / 3.5e-3 on the earlier sessions' CPU; on an AVX2 one ZeRO-2 gives 8.0e-3, the library of 64a6bb5 too: the CPU's kernels'
# rounding, carried by the clipped steps; ZeRO-2 unclipped within 1e-3). A P = 0 to float32 rounding. On a bfloat16 base two ranks drift from
# one process whatever the mode (measured on this sequence, task 3's updates: DDP 0.45, ZeRO-3 0.83 relative; task 1:
# 6.1e-3 / 8.4e-3), so there the first task's updates are compared (2e-2) and the matrix within three eval samples
# (two on the earlier sessions' CPU; three on an AVX2 one, which has no bfloat16 instructions and rounds its products otherwise).
DEEPSPEED_UPDATE_TOLERANCE = 1e-2
FIRST_TASK_TOLERANCE_BF16 = 2e-2
RESIDUAL_TOLERANCE = 1e-5


def run(out: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, str(SCRIPT), str(out), *extra], capture_output=True, text=True, timeout=900)


def assert_close(found: list, reference: list, tolerance: float) -> None:
    assert len(found) == len(reference)
    for row, expected in zip(found, reference):
        assert all(abs(a - b) <= tolerance for a, b in zip(row, expected)), (found, reference)


def worst_update_gap(reference: Path, run_dir: Path, task: str = "") -> float:
    ones, twos = task_updates(reference), task_updates(run_dir)
    keys = [k for k in ones if task in k]
    assert ones.keys() == twos.keys() and keys
    return max(float((ones[k] - twos[k]).norm() / ones[k].norm()) for k in keys)


@pytest.mark.parametrize("stage, options", [(2, ()), (3, ()), (3, ("--train-lora-A",))],
                         ids=["zero2", "zero3", "zero3_trained_A"])
def test_zero_learns_what_one_process_learns(tmp_path, reference_run, stage, options):
    """A trained `A` (`train_lora_A`) is projected after every step through the optimizer's float32 copy too."""
    if options:
        single_dir = tmp_path / "single"
        reference = matrix(run(single_dir, *options, processes=1))
    else:
        single_dir, reference = reference_run
    result = run(tmp_path / "run", "--deepspeed-stage", str(stage), *options)
    assert_close(matrix(result), reference, 1 / 16)
    found = residuals(result)
    assert len(found) == 6 and max(found) <= RESIDUAL_TOLERANCE, found  # 3 tasks x 2 ranks
    assert worst_update_gap(single_dir, tmp_path / "run") <= DEEPSPEED_UPDATE_TOLERANCE
    assert_held(result, sharded=stage == 3)


def assert_held(result: subprocess.CompletedProcess, *, sharded: bool) -> None:
    """Under ZeRO-3 each rank holds the bases of part of the targets (the state is sharded by layer) and the parts add
    up to all of them; under ZeRO-2 every rank holds them all."""
    held = [(int(a), int(b)) for a, b in re.findall(r"HELD \d+ (\d+) of (\d+)", result.stdout)]
    assert len(held) == 6, result.stdout[-2000:]  # 3 tasks x 2 ranks
    total = held[0][1]
    for first, second in zip(held[::2], held[1::2]):
        if sharded:
            assert 0 < first[0] < total and first[0] + second[0] == total, held
        else:
            assert first[0] == second[0] == total, held


def test_zero3_with_deepspeeds_bf16_engine_keeps_the_factors_float32(tmp_path):
    """DeepSpeed's bf16 engine casts the whole module to bfloat16: lora_A / lora_B stay float32 (`Float32Factor`), so
    A P stays at float32 rounding (a bfloat16 A leaks ~1e-3) and every task is learned."""
    result = run(tmp_path / "zero3", "--dtype", "bfloat16", "--deepspeed-stage", "3", "--deepspeed-bf16")
    found = matrix(result)
    assert all(found[t + 1][t] >= 0.5 for t in range(3)), found
    assert residuals(result) and max(residuals(result)) <= RESIDUAL_TOLERANCE


def test_zero3_on_a_bfloat16_base(tmp_path):
    single = run(tmp_path / "single", "--dtype", "bfloat16", processes=1)
    sharded = run(tmp_path / "zero3", "--dtype", "bfloat16", "--deepspeed-stage", "3")
    reference, found = matrix(single), matrix(sharded)
    assert_close(found, reference, 3 / 16)
    assert all(found[t + 1][t] >= 0.5 for t in range(3)), found  # every task learned
    assert max(residuals(sharded)) <= RESIDUAL_TOLERANCE
    assert_held(sharded, sharded=True)
    assert worst_update_gap(tmp_path / "single", tmp_path / "zero3", "task0") <= FIRST_TASK_TOLERANCE_BF16


@pytest.mark.parametrize("stage", [2, 3])
def test_a_rank_killed_mid_task_resumes_to_the_same_matrix(tmp_path, reference_run, stage):
    _, reference = reference_run
    out = tmp_path / "run"
    killed = run(out, "--deepspeed-stage", str(stage), "--kill", "train", "--task", "2", "--kill-rank", "1")
    assert killed.returncode != 0
    checkpoint = out / "trainer" / "002_rule1" / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").exists() and not (out / "tasks" / "002_rule1").exists()
    # the checkpoint's adapter holds the task under way whole (under ZeRO-3 the Trainer alone writes no weights there)
    saved = load_file(checkpoint / "adapter_model.safetensors")
    lora_A = [v for k, v in saved.items() if k.endswith("lora_A.weight")]
    assert lora_A and all(v.numel() and v.norm() > 0 for v in lora_A)
    assert_close(matrix(run(out, "--deepspeed-stage", str(stage))), reference, 1 / 16)
