"""Two CPU processes (torchrun, gloo) learn the same sequence as one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapter_updates import task_updates
from test_resume import SCRIPT, matrix

# stated tolerance: every merged task update within 1e-2 relative (float summation order differs across ranks, and the
# steps where max_grad_norm 1.0 acts carry the difference into the clipping coefficient: measured 3.0e-3 on this
# sequence on the earlier sessions' CPU, 5.8e-3 on an AVX2 one; 1.3e-4 before the reference principal count), every accuracy
# within one eval sample (1/16)
DELTA_TOLERANCE = 1e-2
ACCURACY_TOLERANCE = 1 / 16


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, reference_run):
    single_dir, single = reference_run
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path / "double"), "--global-batch", "8"],
        capture_output=True, text=True, timeout=600,
    )
    double = matrix(result)
    assert len(double) == len(single)
    for row_single, row_double in zip(single, double):
        assert all(abs(a - b) <= ACCURACY_TOLERANCE for a, b in zip(row_single, row_double)), (single, double)
    ones, twos = task_updates(single_dir), task_updates(tmp_path / "double")
    assert ones.keys() == twos.keys() and ones
    worst = max(((ones[k] - twos[k]).norm() / ones[k].norm()).item() for k in ones)
    assert worst <= DELTA_TOLERANCE, worst
