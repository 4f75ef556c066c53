"""`keeplora-hf analyze`: registered on the `keeplora-hf` command by `keeplora_hf.cli` (see `add_analyze_parser`).

By default it analyses the demo's pre-trained model on the general eval suite (one eval set per skill) and on the
benchmark's image tasks, fine-tunes a LoRA on one task (frame_colour) as the probe, and writes JSON, plots and a summary with
the recommended ε_w and γ. `--model` may be any LLaVA-style checkpoint directory, with `--eval-json` / `--train-json`
files in the LLaVA JSON format instead of the synthetic sets. `--recipe CONFIG.yaml` analyses what a training recipe
trains instead: its model, its KeepLoRA targets, its tasks and general sets (`keeplora_hf.analysis.analyze_recipe`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arg_types import auto_or, integer, number

logger = logging.getLogger(__name__)

# The LoRA probe's default task: the demo model learns it fully within the probe's 40 steps (0 -> 100 %), so the
# probe measures where a learned task's knowledge goes rather than a half-learned one.
DEFAULT_PROBE_TASK = "frame_colour"
# transformers model_type -> the collators' model family
_FAMILIES = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_next_video": "llava_next_video",
    "video_llava": "video_llava",
    "qwen2_vl": "qwen2_vl",
}


def add_analyze_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`keeplora-hf analyze --model DIR --output-dir DIR [--tasks ...] [--energies ...] [--eval-size N] ...`."""
    from ..analysis import DEFAULT_ENERGIES
    from ..data.synthetic.tasks import IMAGE_TASKS

    analyze = subparsers.add_parser(
        "analyze",
        help="map where a model keeps its knowledge (principal vs residual subspace, shallow vs deep layers) and "
        "recommend principal_energy (eps_w) and layer_scale_gamma (gamma)",
        description="Intervene on the target weights (principal-only / residual-only reconstruction at several "
        "energies; reset or perturb the residual of one depth group at a time; a LoRA on one group only) and "
        "evaluate general and task sets after each. Writes analysis.json, summary.md, intra_layer.png, depth.png "
        "and spectra.png, and prints the recommendation with its evidence. The model is left unchanged.",
    )
    analyze.add_argument("--model", default=None,
                         help="a checkpoint directory (default: the demo model shipped with the package)")
    analyze.add_argument("--recipe", default=None, metavar="CONFIG.yaml",
                         help="a training recipe's config (recipes/*/config_*.yaml): analyse its model, its keeplora "
                         "target_modules, every task's eval split scored by the task's metric and its general sets, "
                         "with the probe on the first task's train split (instead of --model, --tasks, --targets, "
                         "--eval-json, --train-json)")
    analyze.add_argument("--data_root", "--data-root", default=None,
                         help="with --recipe: the folder its task paths are relative to (the recipe's data_root)")
    analyze.add_argument("--output-dir", required=True, help="where analysis.json, summary.md and the plots go")
    analyze.add_argument("--tasks", nargs="+", default=list(IMAGE_TASKS),
                         help=f"synthetic image tasks to evaluate, or 'none' (default: all of {', '.join(IMAGE_TASKS)})")
    analyze.add_argument("--energies", nargs="+", type=number(0.0, 1.0), default=list(DEFAULT_ENERGIES),
                         help="principal energy levels of the intra-layer measurement")
    analyze.add_argument("--eval-size", type=integer(1), default=60,
                         help="samples per general skill and per task (synthetic sets); with --recipe, the first "
                         "rows of each eval set")
    analyze.add_argument("--targets", default=None,
                         help="regex (fullmatch) of the weights to analyse (default: the demo's language targets, "
                         "every attention and MLP projection of the language model)")
    analyze.add_argument("--groups", type=integer(1), default=4, help="depth groups per transformer stack")
    analyze.add_argument("--perturb-scale", default="auto", type=auto_or(number(0.0, low_open=True)),
                         help="norm of the per-group residual noise relative to ||W||_F ('auto': the first of 0.5, 1, "
                         "2, 4, 8, 16 that, applied to every target, removes a quarter of the general knowledge)")
    analyze.add_argument("--inter-energy", default="auto", type=auto_or(number(0.0, 1.0)),
                         help="eps_w whose residual subspace the inter-layer measurement perturbs "
                         "('auto': the recommended eps_w)")
    analyze.add_argument("--reset-energy", default="auto", type=auto_or(number(0.0, 1.0)),
                         help="energy a group is reset to ('auto': the largest tested energy below --inter-energy "
                         "at which resetting every target loses general knowledge)")
    analyze.add_argument("--finetune-task", default=None,
                         help=f"the task of the LoRA probe ('none' to skip; default: {DEFAULT_PROBE_TASK} when among "
                         "--tasks, else the first of --tasks; with --train-json, the eval set it trains for; with "
                         "--recipe, one of its tasks, the first by default)")
    analyze.add_argument("--finetune-steps", type=integer(1), default=40)
    analyze.add_argument("--finetune-rank", type=integer(1), default=8)
    analyze.add_argument("--finetune-lr", type=number(0.0, low_open=True), default=3e-3)
    analyze.add_argument("--finetune-batch-size", type=integer(1), default=16)
    analyze.add_argument("--no-reconstruct", action="store_true",
                         help="skip the fine-tuned model's principal-only reconstruction")
    analyze.add_argument("--eval-json", action="append", default=None, metavar="NAME=FILE",
                         help="an eval set in the LLaVA JSON format (repeatable; replaces the synthetic sets); names "
                         "starting with 'general' are the general sets")
    analyze.add_argument("--train-json", default=None, metavar="FILE",
                         help="the LoRA probe's training data in the LLaVA JSON format (with --finetune-task NAME)")
    analyze.add_argument("--image-folder", default=".", help="where the images of --eval-json / --train-json are")
    analyze.add_argument("--max-length", type=integer(1), default=128, help="the collator's max_length")
    analyze.add_argument("--batch-size", type=integer(1), default=64, help="evaluation batch size")
    analyze.add_argument("--seed", type=integer(0), default=0, help="data, noise and LoRA seed")
    analyze.add_argument("--threads", type=integer(1), default=None,
                         help="CPU threads for torch (default: torch's choice; 1 is often faster on a shared machine)")
    analyze.set_defaults(func=run_analyze)
    return analyze


def _load(path: str | None) -> tuple[Any, Any, str]:
    """Model (float32 on CPU, or on the GPU when there is one), processor and collator family."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..models.demo import SHIPPED_CHECKPOINT, load_demo_model

    location = Path(path) if path is not None else SHIPPED_CHECKPOINT
    model_type = AutoConfig.from_pretrained(location).model_type if (location / "config.json").exists() else "llava"
    if model_type == "llava":
        model, processor = load_demo_model(location)
    else:
        model = AutoModelForImageTextToText.from_pretrained(location, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(location)
    if model_type not in _FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}")
    if torch.cuda.is_available():
        model.to("cuda")
    return model, processor, _FAMILIES[model_type]


def demo_eval_sets(collator: Any, tasks: Sequence[str], eval_size: int, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """`general/<skill>` for each general skill and one set per image task, `eval_size` samples each, collated once."""
    from ..analysis import precollated_eval_set
    from ..data.synthetic.tasks import GENERAL_SKILLS, TASK_SPECS, general_eval_suite, make_task
    from ..models.pretrain import chat_rows

    suite = general_eval_suite(eval_size * len(GENERAL_SKILLS), seed=seed)
    sets = {}
    for skill, spec in GENERAL_SKILLS.items():
        rows = chat_rows([s for s in suite if s.skill == skill])
        sets[f"general/{skill}"] = precollated_eval_set(rows, collator, chance=spec.chance, batch_size=batch_size)
    for task in tasks:
        rows = chat_rows(make_task(task, "eval", eval_size, seed=seed))
        sets[task] = precollated_eval_set(rows, collator, chance=TASK_SPECS[task].chance, batch_size=batch_size)
    return sets


def _json_eval_sets(specs: Sequence[str], image_folder: str, collator: Any, batch_size: int) -> dict[str, Any]:
    from ..analysis import precollated_eval_set
    from ..data.formats import load_llava_json

    sets = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--eval-json takes NAME=FILE, got {spec!r}")
        rows = [dict(row) for row in load_llava_json(file, image_folder)]
        sets[name] = precollated_eval_set(rows, collator, batch_size=batch_size)
    return sets


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    options = {
        "energies": args.energies, "groups": args.groups, "inter_energy": args.inter_energy,
        "perturb_scale": args.perturb_scale, "reset_energy": args.reset_energy,
        "output_dir": args.output_dir, "seed": args.seed,
    }
    probe = {
        "steps": args.finetune_steps, "batch_size": args.finetune_batch_size, "rank": args.finetune_rank,
        "learning_rate": args.finetune_lr, "reconstruct": not args.no_reconstruct, "seed": args.seed,
    }
    results = _analyze_recipe(args, options, probe) if args.recipe else _analyze_model(args, options, probe)
    print(results["recommendation"]["text"])
    print(f"written: {', '.join(results['files'])}")
    return results


def _analyze_recipe(args: argparse.Namespace, options: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    from ..analysis import analyze_recipe

    given = [flag for flag, value in (("--model", args.model), ("--targets", args.targets),
                                      ("--eval-json", args.eval_json), ("--train-json", args.train_json)) if value]
    if given:
        raise SystemExit(f"--recipe takes the model, targets and data from the recipe: drop {' '.join(given)}")
    if args.finetune_task == "none":
        finetune = None
    else:
        finetune = probe | ({"task": args.finetune_task} if args.finetune_task else {})
    overrides = ["--data_root", args.data_root] if args.data_root else []
    return analyze_recipe(args.recipe, overrides, eval_size=args.eval_size, finetune=finetune, **options)


def _analyze_model(args: argparse.Namespace, options: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    from ..analysis import FinetuneSpec, analyze
    from ..data.collators import VLMChatCollator
    from ..data.synthetic.tasks import TASK_SPECS, make_task
    from ..models.demo import DEMO_LANGUAGE_TARGETS
    from ..models.pretrain import chat_rows

    if args.data_root:
        raise SystemExit("--data_root is the data folder of a recipe: it needs --recipe")
    tasks = [] if args.tasks == ["none"] else list(args.tasks)
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {list(TASK_SPECS)} or 'none'")
    model, processor, family = _load(args.model)
    collator = VLMChatCollator(processor, max_length=args.max_length, model_family=family)
    if args.eval_json:
        eval_sets = _json_eval_sets(args.eval_json, args.image_folder, collator, args.batch_size)
    else:
        eval_sets = demo_eval_sets(collator, tasks, args.eval_size, seed=args.seed, batch_size=args.batch_size)

    finetune = None
    task = args.finetune_task
    if task is None and tasks and not args.eval_json:
        task = DEFAULT_PROBE_TASK if DEFAULT_PROBE_TASK in tasks else tasks[0]
    if task is not None and task != "none":
        if args.train_json:
            from ..data.formats import load_llava_json

            train = [dict(row) for row in load_llava_json(args.train_json, args.image_folder)]
        elif task in TASK_SPECS:
            train = chat_rows(make_task(task, "train", args.finetune_steps * args.finetune_batch_size, seed=args.seed))
        else:
            raise SystemExit(f"--finetune-task {task!r} needs --train-json (it is no synthetic task)")
        finetune = FinetuneSpec(task=task, train_dataset=train, collator=collator, **probe)
    return analyze(model, eval_sets, args.targets or DEMO_LANGUAGE_TARGETS, finetune=finetune, **options)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m keeplora_hf.cli.analyze ...`, until `keeplora-hf analyze` is wired into `keeplora_hf.cli`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="keeplora-hf")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    main()
