"""Interrupted runs (SIGKILL during training, evaluation or a checkpoint write) resume to the same results."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("run_toy.py")


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], capture_output=True, text=True, timeout=600)


def residuals(result: subprocess.CompletedProcess) -> list[float]:
    """Every rank's `RESIDUAL <rank> <value>`. The ranks' lines interleave with each other's and the Trainer's output,
    so a value may run into the next rank's word: take the number only."""
    return [float(value) for value in re.findall(r"RESIDUAL \d+ (\d+(?:\.\d+)?(?:e[-+]?\d+)?)", result.stdout)]


def matrix(result: subprocess.CompletedProcess) -> list:
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("MATRIX "))
    return json.loads(line.removeprefix("MATRIX "))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["train", "eval", "save"])
def test_kill_and_resume_gives_the_uninterrupted_matrix(tmp_path, reference_run, where):
    _, reference = reference_run
    out = tmp_path / "run"
    killed = run(out, "--kill", where, "--task", "2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "results.json").exists()
    assert (out / "tasks" / "001_rule0" / "row.json").exists()
    if where == "save":
        assert not (out / "tasks" / "002_rule1").exists()  # the half-written task is not trusted
    resumed = matrix(run(out))
    assert resumed == reference
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"]["keeplora++"]["accuracy_matrix"] == reference
