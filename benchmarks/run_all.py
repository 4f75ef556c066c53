"""Run every benchmark (each in its own process, one after the other) and write results/RESULTS.md.

    python benchmarks/run_all.py            # everything, about two hours on one CPU thread
    python benchmarks/run_all.py --quick    # the tiny model only, a few minutes (a smoke run)
    python benchmarks/run_all.py --report   # only rebuild RESULTS.md from the JSON files in results/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["step_time.py", "--model", "tiny-llava", "--rounds", "150"],
    ["step_time.py", "--model", "llava-100m", "--rounds", "20"],
    ["boundary.py", "--model", "tiny-llava", "--epoch", "50", "--tasks", "3"],
    ["boundary.py", "--model", "llava-100m", "--epoch", "20", "--tasks", "2"],
    ["memory.py", "--model", "tiny-llava", "--repeats", "2"],
    ["memory.py", "--model", "llava-100m", "--repeats", "2"],
    ["memory.py", "--model", "llava-100m", "--repeats", "2", "--batch-size", "1"],
    *[["memory.py", "--model", "llava-7bp-bf16", "--rank", "16", "--text-tokens", "16", "--repeats", "2",
       "--scenarios", "lora_step", "begin_task_first", "begin_task_later", "end_task", "--feature-source", source,
       "--name", f"r16_80tok_{source}"] for source in ("activations", "mean_gradient")],
    ["branch_step_time.py", "--rounds", "7"],
    ["state_size.py", "--model", "tiny-llava", "--tasks", "3"],
    ["state_size.py", "--model", "llava-100m", "--tasks", "3"],
    ["accuracy.py", "--part", "sequence", "--seeds", "5", "--steps", "60"],
    ["accuracy.py", "--part", "layers", "--model", "llava-100m", "--batches", "4"],
    ["principal.py"],
    ["state_size_7b.py"],
    ["state_dtype.py"],
]
QUICK = [
    ["step_time.py", "--model", "tiny-llava", "--rounds", "30"],
    ["boundary.py", "--model", "tiny-llava", "--epoch", "20", "--tasks", "2"],
    ["memory.py", "--model", "tiny-llava", "--repeats", "1"],
    ["state_size.py", "--model", "tiny-llava", "--tasks", "2"],
    ["accuracy.py", "--part", "sequence", "--seeds", "1", "--steps", "20"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only the benchmarks whose script name starts with these")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    if not args.report:
        for command in QUICK if args.quick else FULL:
            if args.only and not any(command[0].startswith(o) for o in args.only):
                continue
            start = time.time()
            print("==>", " ".join(command), flush=True)
            result = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], env=env, cwd=HERE.parent)
            print(f"    exit {result.returncode} after {time.time() - start:.0f} s", flush=True)
    from report import write_report

    print(write_report())


if __name__ == "__main__":
    main()
