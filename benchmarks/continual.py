"""The continual-learning benchmark behind the README's table: every method, three seeds, image (and video) sequence.

    python benchmarks/continual.py --output-dir runs/benchmark [--seeds 3] [--video] [--clip] [--no-image]

Finished (sequence, seed, method) runs are kept and reused, so an interrupted benchmark continues where it stopped;
`summary.md` in the output directory is the table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse

from keeplora_hf.baselines import METHODS
from keeplora_hf.demo import DemoSettings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/benchmark")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--video", action="store_true")
    parser.add_argument("--clip", action="store_true", help="also the CLIP classification sequence")
    parser.add_argument("--no-image", action="store_true", help="with --video / --clip: those sequences alone")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--orders", type=int, default=1, help="task orders: the default one, then fixed permutations")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: the summary of the finished runs (methods run over fewer seeds count fewer)")
    args = parser.parse_args()
    run_demo(DemoSettings(output_dir=args.output_dir, methods=tuple(args.methods), seeds=tuple(range(args.seeds)),
                          video=args.video, clip=args.clip, image=not args.no_image, dtype=args.dtype,
                          orders=args.orders, summary_only=args.summary_only))


if __name__ == "__main__":
    main()
