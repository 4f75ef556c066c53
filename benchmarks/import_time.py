"""Import time of `keeplora_hf` against `import peft, transformers` (which a PEFT user pays anyway), each in a fresh
interpreter, interleaved round by round so both sides see the same machine; the ratio of the medians.

Goal: <= 1.10 (registering the KEEPLORA peft type should cost little beyond peft itself).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from measure import write_result

SIDES = {
    "peft+transformers": "import peft, transformers",
    "keeplora_hf": "import peft, transformers, keeplora_hf",
}


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for code in SIDES.values():  # warm the file cache once
        seconds(code)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side, code in SIDES.items():
            times[side].append(seconds(code))
    medians = {side: statistics.median(values) for side, values in times.items()}
    ratio = medians["keeplora_hf"] / medians["peft+transformers"]
    print(f"median seconds {medians}; ratio {ratio:.3f} (goal <= 1.10)")
    write_result("import_time", {"rounds": args.rounds, "seconds": times, "medians": medians, "ratio": ratio})


if __name__ == "__main__":
    main()
