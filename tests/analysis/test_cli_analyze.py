"""`keeplora-hf analyze`: its arguments, the demo eval sets it builds, and (slow) a whole run on a random demo model."""

from __future__ import annotations

import argparse
import json

import pytest

from keeplora_hf.analysis import DEFAULT_ENERGIES
from keeplora_hf.cli.analyze import add_analyze_parser, demo_eval_sets, main
from keeplora_hf.data.collators import VLMChatCollator
from keeplora_hf.data.synthetic.tasks import GENERAL_SKILLS, IMAGE_TASKS, TASK_SPECS
from keeplora_hf.models.demo import build_demo_model, build_demo_processor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keeplora-hf")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_parser_defaults_analyse_the_demo_on_every_task():
    args = _parser().parse_args(["analyze", "--output-dir", "out"])
    assert args.model is None and args.output_dir == "out" and args.tasks == list(IMAGE_TASKS)
    assert args.energies == list(DEFAULT_ENERGIES) and args.eval_size == 60 and args.finetune_task is None
    assert args.func.__name__ == "run_analyze"
    args = _parser().parse_args(["analyze", "--model", "m", "--output-dir", "o", "--tasks", "digits", "--energies",
                                 "0.5", "1", "--eval-size", "10", "--finetune-task", "none", "--groups", "2"])
    assert (args.model, args.tasks, args.energies, args.eval_size, args.finetune_task, args.groups) == (
        "m", ["digits"], [0.5, 1.0], 10, "none", 2)
    with pytest.raises(SystemExit):
        _parser().parse_args(["analyze"])  # --output-dir is required


def test_demo_eval_sets_cover_each_general_skill_and_task_with_their_chance():
    collator = VLMChatCollator(build_demo_processor(), max_length=128, model_family="llava")
    sets = demo_eval_sets(collator, ["digits", "red_side"], eval_size=4)
    assert list(sets) == [*(f"general/{s}" for s in GENERAL_SKILLS), "digits", "red_side"]
    assert all(s.samples() == 4 for s in sets.values())
    assert sets["general/side"].chance == 0.5 and sets["digits"].chance == TASK_SPECS["digits"].chance


@pytest.mark.slow
def test_analyze_command_runs_end_to_end_on_a_random_demo_model(tmp_path, capsys):
    model_dir = tmp_path / "demo"
    build_demo_model().save_pretrained(model_dir)
    build_demo_processor().save_pretrained(model_dir)
    out = tmp_path / "analysis"
    main(["--model", str(model_dir), "--output-dir", str(out), "--tasks", "count_red", "--energies", "0.6", "1.0",
          "--eval-size", "4", "--groups", "2", "--finetune-steps", "1", "--finetune-batch-size", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "principal_energy (eps_w) =" in printed and "written:" in printed
    payload = json.loads((out / "analysis.json").read_text())
    assert payload["finetune"]["task"] == "count_red" and len(payload["groups"]) == 2
    assert payload["eval_sets"]["general/colour"]["general"] and not payload["eval_sets"]["count_red"]["general"]
