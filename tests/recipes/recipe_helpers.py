"""Helpers of the recipe tests: the repository's recipes, and runs of them in-process or as a command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ACCELERATE_CPU = RECIPES / "accelerate_configs" / "cpu.yaml"
REAL_CONFIGS = sorted(p for p in RECIPES.glob("*/config_*.yaml") if p.name != "config_tiny.yaml")
CPU = ["--bf16", "false", "--fp16", "false", "--use_cpu", "true"]  # parse the GPU configs on this CPU-only machine


def recipe_main(job: str):
    """The `main(argv)` of recipes/<job>/train.py, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"recipe_{job}", RECIPES / job / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_args(job: str, tmp_path: Path, *extra: str) -> list[str]:
    """The tiny config of `job`, writing its data and its run under `tmp_path`."""
    return [str(RECIPES / job / "config_tiny.yaml"), "--data_root", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "run"), *extra]


def run_command(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a launcher command with one intra-op thread per process (the machine's 2 cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def check_results(run_dir: Path, tasks: list[str]) -> dict:
    """The runner's output format: results.json with a (T+1) x T matrix in [0, 1], plots and report beside it."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks"] == tasks
    entry = results["methods"]["keeplora++"]
    matrix = entry["accuracy_matrix"]
    assert len(matrix) == len(tasks) + 1 and all(len(row) == len(tasks) for row in matrix)
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert {"transfer", "avg", "last", "mft", "bwt"} <= set(entry["metrics"])
    assert set(entry["timings_s"]) >= {"train", "task_boundary", "eval"}
    assert (run_dir / "report.md").is_file() and (run_dir / "run.json").is_file()
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["accuracy_over_time_keeplora++.png", "heatmap_keeplora++.png"]
    for index, name in enumerate(tasks, start=1):
        assert (run_dir / "tasks" / f"{index:03d}_{name}" / "adapter" / "adapter_model.safetensors").is_file()
    return results
