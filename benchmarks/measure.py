"""Measurement helpers shared by the benchmarks: interleaved timing, peak memory in a fresh process, results files.

Timing. The CPU is shared, so absolute times drift by 2x within minutes. Every comparison is therefore made inside one
process, with the compared things interleaved (A, B, A, B, ...) and repeated; what is reported is the median of the
per-round ratios, with the medians and the spread of each side.

Memory. Peak resident memory of one operation is measured in a fresh Python process per measurement, without
tracemalloc: after building the model and everything the operation needs, the process collects garbage, returns
freed heap pages to the OS (`malloc_trim(0)`), reads its resident set size (`VmRSS`), resets the kernel's high-water
mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs the operation and reads the high-water mark (`VmHWM`).
The peak therefore includes everything resident at the start (weights, optimizer state, data) plus the operation's
own high point, exactly as the operation would need it on a machine of its own.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def configure_threads(model_name: str | None = None) -> int:
    """One thread (`KEEPLORA_BENCH_THREADS` overrides).

    On a shared 2-core machine, two OpenMP threads stall at every barrier whenever another process holds a core: a
    ~100M-parameter LLaVA step measured 1.5 s at best and 11-25 s typically with two threads, on both compared sides
    alike but with a spread that hides any ratio. One thread has no barriers to stall at.
    """
    threads = int(os.environ.get("KEEPLORA_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every candidate once per round, in rotating order, after `warmup` untimed rounds; seconds per call."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(candidates[name]))
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and range of per-round ratios (rounds are paired: both sides ran back to back)."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {**summary(ratios), "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator)}


# -- peak memory ---------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_mib() -> float:
    """This process's resident memory now, in MiB."""
    return _status_kb("VmRSS") / 1024


def peak_memory(fn: Callable[[], Any]) -> dict[str, float]:
    """Resident memory before `fn` and its high-water mark during `fn`, in MiB (see the module docstring)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    peak = _status_kb("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_mib": peak / 1024, "increase_mib": (peak - before) / 1024}


def isolated(script: str, *args: str, timeout: int = 3600) -> dict[str, Any]:
    """Run `benchmarks/<script> *args` in a fresh interpreter; it prints one JSON object on its last line."""
    command = [sys.executable, str(Path(__file__).resolve().parent / script), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- results -------------------------------------------------------------------------------------------------------


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
