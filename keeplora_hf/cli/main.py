"""The `keeplora-hf` command."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from ..baselines import DEFAULT_METHODS, METHODS
from .analyze import add_analyze_parser
from .push import add_export_parser, add_push_parser
from .arg_types import integer


def _demo(args: argparse.Namespace) -> None:
    from ..demo import DemoSettings, run_demo

    methods = tuple(METHODS) if args.methods == ["all"] else tuple(args.methods)
    run_demo(
        DemoSettings(
            output_dir=args.output_dir,
            methods=methods,
            seeds=tuple(range(args.seeds)),
            model_path=args.model,
            overwrite=args.overwrite,
            video=args.video,
            clip=args.clip,
            image=not args.no_image,
            clip_model_path=args.clip_model,
            dtype=args.dtype,
            orders=args.orders,
            data_seed=args.data_seed,
            **({"tasks": tuple(_task_order(args.task_order))} if args.task_order else {}),
        )
    )


def _task_order(text: str) -> list[str]:
    from ..data.synthetic.tasks import IMAGE_TASKS

    order = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in order if t not in IMAGE_TASKS]
    if unknown or len(set(order)) != len(order) or not order:
        raise SystemExit(
            f"keeplora-hf demo: error: --task-order must list distinct image tasks from {', '.join(IMAGE_TASKS)}; got "
            f"{text!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return order


def _pretrain(args: argparse.Namespace) -> None:
    from ..models.pretrain import PretrainSettings, pretrain

    report = pretrain(args.output_dir, PretrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed))
    print({skill: f"{100 * value:.1f}%" for skill, value in report["general_suite"].items()})


def _pretrain_clip(args: argparse.Namespace) -> None:
    from ..models.pretrain_clip import ClipPretrainSettings, pretrain_clip

    settings = ClipPretrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    report = pretrain_clip(args.output_dir, settings)
    print({skill: f"{100 * value:.1f}%" for skill, value in report["general_skills"].items()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeplora-hf", description="KeepLoRA++ continual learning for VLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the offline continual benchmark on the pre-trained demo VLM")
    demo.add_argument("--output-dir", default="keeplora-demo", help="where results, plots and checkpoints go")
    demo.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                      help=f"methods to compare, or 'all'; choices: {', '.join(METHODS)}")
    demo.add_argument("--seeds", type=integer(1), default=1, help="number of seeds (0, 1, ...); the summary gives mean ± std")
    demo.add_argument("--video", action="store_true", help="also run the video sequence on a tiny LLaVA-NeXT-Video")
    demo.add_argument("--clip", action="store_true",
                      help="also run the CLIP classification sequence (MTIL's Transfer / Avg / Last) on the demo CLIP")
    demo.add_argument("--no-image", action="store_true", help="with --video / --clip: those sequences alone")
    demo.add_argument("--clip-model", default=None, help="a pre-trained demo CLIP directory (default: the shipped one)")
    demo.add_argument("--model", default=None, help="a pre-trained demo model directory (default: the shipped one)")
    demo.add_argument("--overwrite", action="store_true", help="replace results of a run with other settings")
    demo.add_argument("--task-order", default=None, metavar="A,B,...",
                      help="the image tasks, comma-separated, in the order they are learned (default: the order of docs/results.md)")
    demo.add_argument("--orders", type=integer(1), default=1,
                      help="also run N-1 fixed random permutations of the task order; the summary gives the spread")
    demo.add_argument("--data-seed", type=integer(0), default=0, help="seed of the synthetic benchmark data")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="the base model's dtype (bfloat16: as 7B models are trained; the adapters stay float32)")
    demo.set_defaults(func=_demo)

    pre = sub.add_parser("pretrain", help="pre-train the demo VLM on the general synthetic corpus")
    pre.add_argument("--output-dir", required=True)
    pre.add_argument("--steps", type=integer(1), default=2500)
    pre.add_argument("--batch-size", type=integer(1), default=48)
    pre.add_argument("--seed", type=integer(0), default=0)
    pre.set_defaults(func=_pretrain)

    pre_clip = sub.add_parser("pretrain-clip", help="pre-train the demo CLIP on the general skills (classification)")
    pre_clip.add_argument("--output-dir", required=True)
    pre_clip.add_argument("--steps", type=integer(1), default=1200)
    pre_clip.add_argument("--batch-size", type=integer(1), default=64)
    pre_clip.add_argument("--seed", type=integer(0), default=0)
    pre_clip.set_defaults(func=_pretrain_clip)
    add_analyze_parser(sub)
    add_push_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
