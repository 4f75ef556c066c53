"""The embedded CLIP sequence: its data in the users' classification format, the methods through the harness
(KeepLoRA++cls's heads on tasks of different class counts), MTIL's metrics, resuming, and the command line."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from keeplora_hf.baselines import METHODS
from keeplora_hf.cli import build_parser
from keeplora_hf.data.synthetic.classification import (
    CLIP_CANDIDATE_TASKS,
    CLIP_GENERAL_SKILLS,
    class_prompt,
    load_clip_benchmark,
    write_clip_benchmark,
)
from keeplora_hf.data.synthetic.classification import skill_spec
from keeplora_hf.data.synthetic.tasks import make_task
from keeplora_hf.demo import DemoSettings, run_demo
from keeplora_hf.models.demo_clip import SHIPPED_CLIP_CHECKPOINT, load_demo_clip
from keeplora_hf.models.pretrain_clip import ClipPretrainSettings, pretrain_clip


TASKS = ("count_red", "frame_colour", "colour_count")  # 4, 6 and 4 classes


@pytest.fixture(scope="module")
def quick_clip(tmp_path_factory):
    """A barely pre-trained demo CLIP: the harness is under test here, not the model's knowledge."""
    path = tmp_path_factory.mktemp("model") / "demo_clip"
    report = pretrain_clip(path, ClipPretrainSettings(steps=4, batch_size=8, corpus_size=32, eval_size=16))
    assert set(report["general_skills"]) == set(CLIP_GENERAL_SKILLS)
    return path


def test_clip_data_is_the_chat_benchmarks_images_as_class_tables(tmp_path):
    data_dir = write_clip_benchmark(tmp_path / "clip", train_size=8, eval_size=4, general_size=8, seed=0)
    data = load_clip_benchmark(data_dir)
    assert set(data["tasks"]) == set(CLIP_CANDIDATE_TASKS) and set(data["general"]) == set(CLIP_GENERAL_SKILLS)
    for name, splits in data["tasks"].items():
        rows, answers = splits["train"], skill_spec(name).answers
        assert rows.features["label"].names == list(answers)
        assert set(rows["task"]) == {name}
        samples = make_task(name, "train", 8, seed=0)  # the chat benchmark's images, for its six tasks
        assert [answers[i] for i in rows["label"]] == [s.answer for s in samples]
        assert np.array_equal(np.asarray(Image.open(rows[0]["image"])), np.asarray(samples[0].image))
    with open(data_dir / "digits" / "eval.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["image", "label"]
    assert class_prompt("frame_colour").format("red") == "what colour is the frame red"
    # written once; other settings in the same place are refused, not mixed in
    assert write_clip_benchmark(data_dir, train_size=8, eval_size=4, general_size=8, seed=0) == data_dir
    with pytest.raises(ValueError, match="other settings"):
        write_clip_benchmark(data_dir, train_size=16, eval_size=4, general_size=8, seed=0)


def test_the_shipped_demo_clip_knows_its_general_skills():
    model, processor = load_demo_clip()
    report = json.loads((SHIPPED_CLIP_CHECKPOINT / "pretrain.json").read_text())
    assert min(report["general_skills"].values()) >= 0.8, report["general_skills"]
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id


@pytest.mark.slow
def test_clip_sequence_runs_every_kind_of_method_and_resumes(tmp_path, quick_clip, caplog):
    settings = DemoSettings(
        output_dir=str(tmp_path / "demo"), image=False, clip=True, clip_model_path=str(quick_clip),
        methods=("zero-shot", "seq-lora", "keeplora++cls", "joint-lora"), clip_tasks=TASKS,
        clip_train_size=16, clip_eval_size=8, general_size=8, clip_epochs=1, batch_size=8,
    )
    summary = run_demo(settings)
    assert set(summary["sequences"]) == {"clip"}
    results = json.loads((tmp_path / "demo" / "clip" / "seed0" / "results.json").read_text())
    assert results["tasks"] == list(TASKS)
    for name, entry in results["methods"].items():
        assert len(entry["accuracy_matrix"]) == len(TASKS) + 1, name
        assert set(entry["general"]) == set(CLIP_GENERAL_SKILLS), name
    sequential = results["methods"]["keeplora++cls"]
    assert sequential["metrics"]["transfer"] is not None and sequential["metrics"]["last"] is not None
    # one head per task, of its own class count: count_red (4 classes) is followed by frame_colour (6), whose
    # begin_task scores its own prompts without count_red's head (which raised before)
    adapter = tmp_path / "demo" / "clip" / "seed0" / "keeplora++cls" / "tasks" / "003_colour_count" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    rows = [saved[f"keeplora_heads.task{i}.weight"].shape[0] for i in range(len(TASKS))]
    assert rows == [len(skill_spec(t).answers) for t in TASKS]
    joint = results["methods"]["joint-lora"]
    assert joint["accuracy_matrix"][1] == [None] * len(TASKS) and joint["metrics"]["last"] is not None
    again = run_demo(settings)
    assert json.loads(json.dumps(again, default=str)) == json.loads(json.dumps(summary, default=str))
    # a summary of what is there: keeplora++ never ran, so it is left out rather than run
    collected = run_demo(replace(settings, methods=(*settings.methods, "keeplora++"), summary_only=True))
    assert json.dumps(collected["sequences"]["clip"], sort_keys=True) == json.dumps(summary["sequences"]["clip"], sort_keys=True)
    assert not (tmp_path / "demo" / "clip" / "seed0" / "keeplora++").exists()
    reordered = run_demo(replace(settings, methods=("zero-shot",), orders=2))  # its own sequences, its own summary
    assert set(reordered["sequences"]) == {"clip", "clip-order1", "clip, 2 orders"}
    assert reordered["sequences"]["clip, 2 orders"]["seeds"] == ["order0/seed0", "order1/seed0"]


def test_heads_methods_are_skipped_on_sequences_without_a_classifier(tmp_path):
    from keeplora_hf.harness import Budget, Sequence

    sequence = Sequence("image", [], [], None, None, Budget(1, 1, 1e-3, 1, 1), "x", {})
    assert not sequence.supports(METHODS["keeplora++cls"]) and sequence.supports(METHODS["keeplora++"])


def test_cli_clip_flags():
    args = build_parser().parse_args(["demo", "--clip", "--clip-model", "m"])
    assert args.clip and args.clip_model == "m"
    args = build_parser().parse_args(["pretrain-clip", "--output-dir", "o", "--steps", "5"])
    assert args.steps == 5 and args.func.__name__ == "_pretrain_clip"
