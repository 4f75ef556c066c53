"""`keeplora-hf push` and `keeplora-hf export`, registered on the `keeplora-hf` command by `keeplora_hf.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..continual.checkpoint import read_json
from ..continual.run_dir import ADAPTER_FILES, ROW_ZERO, RUN_FILE, TASKS_DIR

_BASE_HELP = (
    "the pre-trained model the run started from, as a Hub id or a local directory, to rebuild the run for the "
    "plain-LoRA export (default: the base_model_name_or_path the adapter records)"
)


def add_push_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`keeplora-hf push RUN_DIR REPO_ID`: adapter + continual state, plain LoRA, results, plots, card; one commit."""
    push = subparsers.add_parser(
        "push",
        help="push a continual run to the Hugging Face Hub (adapter with its continual state, plain-LoRA export, "
        "results, plots, model card) in one commit",
        description="Push a ContinualRunner output directory to a Hub model repo in one commit. Nothing in RUN_DIR is "
        "changed. Continue from the pushed run with keeplora_hf.hub.load_run / seed_run_dir.",
    )
    push.add_argument("run_dir",
                      help=f"the runner's output directory ({RUN_FILE}, {ROW_ZERO}, {TASKS_DIR}/NNN_<name>/...)")
    push.add_argument("repo_id", help="the Hub model repo, 'namespace/name' (created if missing)")
    push.add_argument("--base-model", default=None, help=_BASE_HELP)
    push.add_argument(
        "--per-task-revisions", nargs="?", const="branch", choices=["branch", "tag"], default=None,
        help="also give every learned task a revision task-NNN-<name> with the state after it: a branch (default) "
        "or a tag",
    )
    push.add_argument("--private", action="store_true",
                      help="create the repo private (an existing repo keeps its visibility)")
    push.add_argument("--token", default=None,
                      help="a Hub token with write access (default: the logged-in one, or HF_TOKEN)")
    push.add_argument("--message", default=None, help="the commit message")
    push.add_argument("--base-model-id", default=None,
                      help="the base model's Hub id for the card, when the run was learned on a local copy of it")
    push.add_argument("--license", default=None, help="the card's license, e.g. apache-2.0")
    push.add_argument("--dataset", action="append", default=None, help="a Hub dataset id for the card (repeatable)")
    push.set_defaults(func=_push)
    return push


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`keeplora-hf export RUN_DIR OUT [--after-task K]`: the plain LoRA of the first K tasks, rank K*r."""
    export = subparsers.add_parser(
        "export",
        help="write a run's change as one plain PEFT LoRA (rank K*r) that loads without keeplora_hf",
        description="Export the plain LoRA of a run's first K tasks (default: every learned task) into OUT. RUN_DIR "
        "may also be the repo id of a pushed run.",
    )
    export.add_argument("run_dir", help="the runner's output directory, or a pushed run's Hub repo id")
    export.add_argument("out", help="the directory to write the plain LoRA adapter to (empty or absent)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a previous export (nothing else)")
    form = export.add_mutually_exclusive_group()
    form.add_argument("--language-model-only", action="store_true",
                      help="the LoRA of the language model's targets only (what vLLM and SGLang serve), with a merged "
                      "base checkpoint in OUT/base_model for everything else the run changed")
    form.add_argument("--merged", action="store_true",
                      help="one full checkpoint with every learned task folded in (from_pretrained, any server)")
    export.add_argument("--after-task", type=int, default=None, metavar="K",
                        help="export the first K tasks (1..learned; default: all learned tasks)")
    export.add_argument("--base-model", default=None, help=_BASE_HELP)
    export.add_argument("--revision", default=None, help="the revision of a pushed run (e.g. task-002-<name>)")
    export.set_defaults(func=_export)
    return export


def _push(args: argparse.Namespace) -> None:
    from ..hub import HubOfflineError, push_run

    try:
        result = push_run(
            args.run_dir,
            args.repo_id,
            base_model=args.base_model,
            per_task_revisions=args.per_task_revisions or False,
            private=args.private,
            token=args.token,
            commit_message=args.message,
            base_model_id=args.base_model_id,
            license=args.license,
            datasets=args.dataset,
        )
    except (ValueError, TypeError, FileNotFoundError, HubOfflineError) as error:
        raise SystemExit(f"keeplora-hf push: error: {error}") from None
    print(f"pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}")
    for name, commit in result.revisions.items():
        print(f"  revision {name}: {commit}")


def _export(args: argparse.Namespace) -> None:
    from ..hub import HubOfflineError, export_run

    try:
        out = export_run(args.run_dir, args.out, after_task=args.after_task, base_model=args.base_model,
                         revision=args.revision, overwrite=args.overwrite, merged=args.merged,
                         language_model_only=args.language_model_only)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, HubOfflineError) as error:
        raise SystemExit(f"keeplora-hf export: error: {error}") from None
    if args.merged:
        print(f"wrote a merged checkpoint to {out}")
    else:
        config = read_json(Path(out) / ADAPTER_FILES[0])
        print(f"wrote a plain LoRA (rank {config['r']}: --max-lora-rank {config['r']} to serve it) to {out}")
