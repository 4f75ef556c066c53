"""A short demo run: every kind of method goes through the harness and lands in results, plots and a summary."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from keeplora_hf.cli import build_parser
from keeplora_hf.demo import DemoSettings, run_demo
from keeplora_hf.models.pretrain import PretrainSettings, pretrain


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    """A barely pre-trained demo model: the harness is under test here, not the model's knowledge."""
    path = tmp_path_factory.mktemp("model") / "demo_vlm"
    pretrain(path, PretrainSettings(steps=2, batch_size=8, corpus_size=16, eval_size=10))
    return path


@pytest.mark.slow
def test_short_demo_run_writes_results_and_resumes(tmp_path, quick_model, capsys):
    settings = DemoSettings(
        output_dir=str(tmp_path / "demo"),
        methods=("zero-shot", "keeplora++", "osf", "joint-lora", "single-task-lora"),
        tasks=("count_red", "digits"),
        train_size=16, eval_size=8, general_size=10, epochs=1, batch_size=8,
        model_path=str(quick_model), video=True, video_train_size=8, video_eval_size=4, video_epochs=1,
    )
    summary = run_demo(settings)
    out = tmp_path / "demo"
    assert set(summary["sequences"]["image"]["methods"]) == set(settings.methods)
    results = json.loads((out / "image" / "seed0" / "results.json").read_text())
    assert results["tasks"] == ["count_red", "digits"]
    for name, entry in results["methods"].items():
        assert len(entry["accuracy_matrix"]) == 3, name
        assert set(entry["general"]) == {"general"}
    joint = results["methods"]["joint-lora"]
    assert joint["accuracy_matrix"][1] == [None, None]
    assert joint["metrics"]["last"] == sum(joint["accuracy_matrix"][-1]) / 2
    assert joint["metrics"]["mft"] is None and joint["metrics"]["bwt"] is None  # no sequence, no plasticity or forgetting
    alone = results["methods"]["single-task-lora"]
    assert alone["accuracy_matrix"][0] == results["methods"]["zero-shot"]["accuracy_matrix"][0]  # the pre-trained model
    assert alone["accuracy_matrix"][1] == [None, None] and None not in alone["accuracy_matrix"][-1]
    assert alone["metrics"]["last"] == sum(alone["accuracy_matrix"][-1]) / 2
    assert alone["metrics"]["mft"] is None and alone["metrics"]["general_retention"] is None
    assert len(list((out / "image" / "seed0" / "single-task-lora" / "trainer").iterdir())) == 2  # one run per task
    assert (out / "summary.md").exists() and list((out / "image" / "seed0").glob("heatmap_*.png"))
    assert (out / "data" / "manifest.json").exists()
    assert "| keeplora++ |" in capsys.readouterr().out
    video = json.loads((out / "video" / "seed0" / "results.json").read_text())
    assert video["tasks"] == ["direction", "flash_count", "first_colour"]
    assert len(video["methods"]["keeplora++"]["accuracy_matrix"]) == 4

    # a second call finds every method done and only re-reads results
    again = run_demo(settings)
    assert json.loads(json.dumps(again, default=str)) == json.loads(json.dumps(summary, default=str))
    # ... but not with other settings: finished runs of 1 epoch are not passed off as runs of 2
    with pytest.raises(ValueError, match=r"image/seed0/zero-shot holds a finished run .*differs in: epochs"):
        run_demo(replace(settings, epochs=2))


def test_cli_rejects_unknown_methods(tmp_path):
    args = build_parser().parse_args(["demo", "--methods", "nope", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown methods"):
        args.func(args)


@pytest.mark.slow
def test_task_orders_run_as_their_own_sequences_with_a_summary_over_orders(tmp_path, quick_model):
    settings = DemoSettings(
        output_dir=str(tmp_path / "demo"), methods=("zero-shot", "seq-lora"), tasks=("count_red", "digits"), orders=2,
        train_size=8, eval_size=8, general_size=8, epochs=1, batch_size=8, model_path=str(quick_model),
    )
    summary = run_demo(settings)
    assert set(summary["sequences"]) == {"image", "image-order1", "image, 2 orders"}
    reordered = json.loads((tmp_path / "demo" / "image-order1" / "seed0" / "results.json").read_text())
    assert reordered["tasks"] == ["digits", "count_red"]
    assert summary["sequences"]["image, 2 orders"]["seeds"] == ["order0/seed0", "order1/seed0"]


def test_cli_task_order_and_dtype_are_checked(tmp_path):
    args = build_parser().parse_args(["demo", "--task-order", "digits,nope", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown: nope"):
        args.func(args)
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_demo(DemoSettings(output_dir=str(tmp_path), dtype="float16"))


def test_data_written_before_the_tasks_changed_is_refused(tmp_path):
    """An output directory of the first task set holds its data and finished runs: reusing them would mix task sets."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format": "keeplora-synthetic/1", "image_task_order": []}))
    with pytest.raises(ValueError, match="keeplora-synthetic/1, not keeplora-synthetic/2"):
        run_demo(DemoSettings(output_dir=str(tmp_path), methods=("zero-shot",)))
