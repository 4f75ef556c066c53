"""`keeplora-hf analyze --recipe`: a training recipe's model, targets, tasks and metrics, end to end on the tiny configs.

Each tiny config writes its own tiny data into `--data_root`; the runs keep to two energies, two depth groups and a
probe of a few steps, so each takes seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from keeplora_hf.recipes import tasks as recipe_tasks
from keeplora_hf.analysis import analyze_recipe
from keeplora_hf.cli.analyze import main
from keeplora_hf.models import build_tiny
from keeplora_hf.models.tiny import matching_modules

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SMALL = {"energies": [0.6, 1.0], "groups": 2}


def _targets(job: str, tiny: str) -> dict[str, list[int]]:
    """name -> weight shape of every module the recipe's keeplora.target_modules selects in its tiny model."""
    pattern = yaml.safe_load((RECIPES / job / "config_tiny.yaml").read_text())["keeplora"]["target_modules"]
    return {name: list(m.weight.shape) for name, m in matching_modules(build_tiny(tiny).model, pattern).items()}


def _check_unchanged_reconstruction(payload: dict) -> None:
    """Principal-only reconstruction at energy 1.0 is the weight itself: every set scores as the untouched model."""
    assert payload["intra_layer"]["principal"]["1"]["accuracy"] == payload["baseline"]["accuracy"]
    tuned = payload["finetune"]["all_groups"]
    assert tuned["principal"]["1"]["accuracy"] == tuned["finetuned"]["accuracy"]


def _tiny_config(tmp_path: Path, **changes) -> Path:
    """The LLaVA tiny config with `changes`, as a file of its own."""
    config = yaml.safe_load((RECIPES / "llava_vqa" / "config_tiny.yaml").read_text()) | changes
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_llava_recipe_end_to_end(tmp_path):
    """Every task is an eval set of its whole eval file; spectra are exactly the recipe's targets; the probe learns
    the first task, and the tasks after it stand for general knowledge (the tiny config has no general sets)."""
    out = tmp_path / "analysis"
    results = analyze_recipe(RECIPES / "llava_vqa" / "config_tiny.yaml", ["--data_root", str(tmp_path / "data")],
                             finetune={"steps": 4, "batch_size": 4}, output_dir=out, **SMALL)
    payload = json.loads((out / "analysis.json").read_text())
    assert payload["eval_sets"] == {
        "colour": {"chance": 0.0, "size": 4, "general": False},
        "pair": {"chance": 0.0, "size": 4, "general": True},
        "choice": {"chance": 0.0, "size": 4, "general": True},
    }
    assert payload["finetune"]["task"] == "colour" and payload["task_sets"] == ["colour"]
    assert {s["name"]: s["shape"] for s in payload["spectra"]} == _targets("llava_vqa", "llava")
    assert [g["name"] for g in payload["groups"]] == ["model.language_model.layers[0]", "model.language_model.layers[1]"]
    _check_unchanged_reconstruction(payload)
    assert results["recommendation"]["text"].startswith("principal_energy (eps_w) =")
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "depth.png", "intra_layer.png", "spectra.png",
                                                     "summary.md"]


def test_video_recipe_through_the_command(tmp_path, capsys):
    """`keeplora-hf analyze --recipe ... --data_root ...` on Video-LLaVA clips: --eval-size caps each eval set,
    --finetune-task picks another task for the probe, and the remaining task is the general one."""
    pytest.importorskip("av")
    out = tmp_path / "analysis"
    main(["--recipe", str(RECIPES / "video_llm" / "config_tiny.yaml"), "--data_root", str(tmp_path / "data"),
          "--output-dir", str(out), "--energies", "0.6", "1", "--groups", "2", "--eval-size", "3",
          "--finetune-task", "last", "--finetune-steps", "2", "--finetune-batch-size", "4", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "principal_energy (eps_w) =" in printed and "written:" in printed
    payload = json.loads((out / "analysis.json").read_text())
    assert {n: (s["size"], s["general"]) for n, s in payload["eval_sets"].items()} == {
        "first": (3, True), "last": (3, False)}
    assert payload["finetune"]["task"] == "last"
    assert {s["name"]: s["shape"] for s in payload["spectra"]} == _targets("video_llm", "video_llava")
    _check_unchanged_reconstruction(payload)


def test_clip_recipe_is_scored_zero_shot_with_its_chance(tmp_path):
    """CLIP's recipe: both towers' targets, zero-shot accuracy with chance 1 / classes, a probe on CLIP's loss."""
    results = analyze_recipe(RECIPES / "clip_mtil" / "config_tiny.yaml", ["--data_root", str(tmp_path / "data")],
                             finetune={"steps": 2, "batch_size": 4}, output_dir=tmp_path / "analysis", **SMALL)
    assert results["eval_sets"] == {"primary": {"chance": 1 / 3, "size": 6, "general": False},
                                    "secondary": {"chance": 1 / 3, "size": 6, "general": True}}
    assert {s["name"]: s["shape"] for s in results["spectra"]} == _targets("clip_mtil", "clip")
    assert {g["stack"] for g in results["groups"]} == {"text_model.encoder.layers", "vision_model.encoder.layers"}
    _check_unchanged_reconstruction(results)


def test_each_set_keeps_its_recipe_metric_and_general_sets_are_general(tmp_path, monkeypatch):
    """Each eval set is scored by its entry's own metric and generation length; `general_sets` are the general ones."""
    calls = []
    score = {"exact_match": 0.25, "vqa": 0.5, "multiple_choice": 0.75}

    def fake_generation_metric(collator, normalizer, *, batch_size, max_new_tokens):
        calls.append((normalizer, batch_size, max_new_tokens))
        return lambda model, dataset: score[normalizer]

    monkeypatch.setattr(recipe_tasks, "generation_metric", fake_generation_metric)
    held_out = {"name": "held_out", "eval_file": "pair/eval.json", "metric": "vqa", "max_new_tokens": 2}
    results = analyze_recipe(_tiny_config(tmp_path, general_sets=[held_out]), ["--data_root", str(tmp_path / "data")],
                             finetune=None, **SMALL)
    assert results["baseline"]["accuracy"] == {"colour": 0.25, "pair": 0.5, "choice": 0.75, "held_out": 0.5}
    assert results["general_sets"] == ["held_out"] and results["task_sets"] == ["colour", "pair", "choice"]
    assert calls == [("exact_match", 4, 4), ("vqa", 4, 4), ("multiple_choice", 4, 4), ("vqa", 4, 2)]
    assert "finetune" not in results


def test_bad_recipes_are_refused_naming_the_file_and_field(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError, match=f"recipe config {re.escape(str(missing))} not found"):
        analyze_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [\n  - {name: a\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}: not valid YAML"):
        analyze_recipe(broken)
    no_eval = _tiny_config(tmp_path, tasks=[{"name": "colour", "train_file": "colour/train.json"},
                                            {"name": "pair", "train_file": "pair/train.json"}])
    with pytest.raises(ValueError, match=re.escape(f"{no_eval}: ['colour', 'pair'] have no `eval_file`")):
        analyze_recipe(no_eval)
    alone = _tiny_config(tmp_path, tasks=[{"name": "colour", "train_file": "c.json", "eval_file": "e.json"}])
    with pytest.raises(ValueError, match=re.escape(f"{alone}: analyze needs a general eval set")):
        analyze_recipe(alone)
    with pytest.raises(ValueError, match=r"the probe's task 'size' is not a task of .*\['colour', 'pair', 'choice'\]"):
        analyze_recipe(RECIPES / "llava_vqa" / "config_tiny.yaml", finetune={"task": "size"})
    with pytest.raises(SystemExit, match="--recipe takes the model, targets and data from the recipe: drop --model"):
        main(["--recipe", str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--model", "m", "--output-dir", "o"])
    with pytest.raises(SystemExit, match="--data_root is the data folder of a recipe: it needs --recipe"):
        main(["--data_root", "d", "--output-dir", "o"])
