"""Real-format files made here, with malformed rows: every bad row is named (file and row) before training starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from keeplora_hf.data import DataFormatError
from keeplora_hf.recipes import parse_recipe_args
from recipe_helpers import RECIPES, recipe_main

LONG_ANSWER = " ".join(["red"] * 150)  # longer than the tiny configs' max_length on its own


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(path)
    return path.name


def _chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _config(job: str, tmp_path: Path, tasks: list[dict]) -> str:
    """The job's tiny config with its own task list, data in tmp_path/data, no synthetic data written."""
    config = yaml.safe_load((RECIPES / job / "config_tiny.yaml").read_text())
    config.update(tasks=tasks, tiny_data=False, data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "run"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _failure(job: str, config: str) -> list[str]:
    with pytest.raises(DataFormatError) as error:
        recipe_main(job)([config])
    return error.value.errors


def test_llava_json_malformed_rows_are_each_named(tmp_path, one_thread):
    data = tmp_path / "data"
    good = _image(data / "a.png")
    train = _write(data / "vqa" / "train.json", [
        {"id": "ok", "image": good, "conversations": _chat("<image>\nwhat colour?", "red")},
        {"id": "no-file", "image": "missing.png", "conversations": _chat("<image>\nwhat colour?", "red")},
        {"id": "no-marker", "image": good, "conversations": _chat("what colour?", "red")},
        {"id": "empty", "image": good, "conversations": []},
        {"id": "multi", "image": [good, good], "conversations": _chat("<image>\n<image>\nsame colour?", "yes")
         + _chat("is it red?", "yes")},
    ])
    test = _write(data / "vqa" / "test.json", [
        {"id": "fine", "image": good, "conversations": _chat("<image>\nwhat colour?", "red")},
        {"id": "too-long", "image": good, "conversations": _chat("<image>\nwhat colour?", LONG_ANSWER)},
    ])
    config = _config("llava_vqa", tmp_path, [{"name": "vqa", "train_file": "vqa/train.json", "eval_file": "vqa/test.json"}])
    errors = _failure("llava_vqa", config)
    assert len(errors) == 4, errors
    assert errors[0].startswith(f"{train}: row 1 (id 'no-file'): image file") and "not found" in errors[0]
    assert errors[1].startswith(f"{train}: row 2 (id 'no-marker'): 0 <image> marker(s) in the human turns but 1 image(s)")
    assert errors[2] == f"{train}: row 3 (id 'empty'): missing or empty 'conversations'"
    assert errors[3].startswith(f"{test}: row 1 (id 'too-long'): ") and "lie past max_length=96" in errors[3]
    assert not (tmp_path / "run").exists()  # refused before the runner claimed its output directory


def test_video_qa_json_malformed_rows_are_each_named(tmp_path, one_thread):
    pytest.importorskip("av")
    from keeplora_hf.data import write_video

    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    write_video(data / "videos" / "short.mp4", np.full((3, 16, 16, 3), 100, dtype=np.uint8))
    write_video(data / "videos" / "long.mp4", np.full((9, 16, 16, 3), 50, dtype=np.uint8))
    train = _write(data / "clips" / "train.json", [
        {"id": "qa", "video": "short.mp4", "question": "what colour?", "answer": "red", "options": ["red", "blue"]},
        {"id": "no-file", "video": "gone.mp4", "question": "what colour?", "answer": "red"},
        {"id": "no-marker", "video": "long.mp4", "conversations": _chat("what colour?", "red")},
        {"id": "empty", "video": "long.mp4", "conversations": []},
        {"id": "no-video", "question": "what colour?", "answer": "red"},
        {"id": "chat", "video": "long.mp4", "conversations": _chat("<video>\nwhat colour?", "red")},
    ])
    test = _write(data / "clips" / "test.json", [
        {"id": "too-long", "video": "short.mp4", "question": "what colour?", "answer": LONG_ANSWER},
    ])
    config = _config("video_llm", tmp_path, [
        {"name": "clips", "train_file": "clips/train.json", "eval_file": "clips/test.json", "video_folder": "videos"}])
    errors = _failure("video_llm", config)
    assert len(errors) == 5, errors
    assert errors[0].startswith(f"{train}: row 1 (id 'no-file'): video file") and "not found" in errors[0]
    assert errors[1] == f"{train}: row 2 (id 'no-marker'): 0 <video> marker(s) in the human turns but 1 video(s)"
    assert errors[2] == f"{train}: row 3 (id 'empty'): missing or empty 'conversations'"
    assert errors[3] == f"{train}: row 4 (id 'no-video'): missing 'video'"
    assert errors[4].startswith(f"{test}: row 0 (id 'too-long'): ") and "lie past max_length=128" in errors[4]
    assert not (tmp_path / "run").exists()


def test_answer_lists_are_carried_and_checked(tmp_path, one_thread):
    """VQA rows' `answers` lists reach the eval set; a row lacking one when others have it is refused by name."""
    data = tmp_path / "data"
    good = _image(data / "a.png")
    row = {"image": good, "conversations": _chat("<image>\nwhat colour?", "red")}
    _write(data / "v" / "train.json", [dict(row, id="t")])
    test = _write(data / "v" / "test.json", [dict(row, id="x", answers=["red", "red", "dark red"]), dict(row, id="y")])
    config = _config("llava_vqa", tmp_path, [{"name": "v", "train_file": "v/train.json", "eval_file": "v/test.json",
                                              "metric": "vqa"}])
    errors = _failure("llava_vqa", config)
    assert errors == [f"{test}: row 1 (id 'y'): 'answers' must be a non-empty list of answers when other rows have one, "
                      "got None"]

    from keeplora_hf.data import VLMChatCollator
    from keeplora_hf.models import build_tiny_processor
    from keeplora_hf.recipes import build_chat_tasks

    _write(data / "v" / "test.json", [dict(row, id="x", answers=["red", "red", "dark red"])])
    parsed = parse_recipe_args([config])
    collator = VLMChatCollator(build_tiny_processor("llava"), max_length=96, model_family="llava")
    tasks, _ = build_chat_tasks(parsed, collator, media="image")
    assert tasks[0].eval_dataset[0]["answers"] == ["red", "red", "dark red"]
    assert "answers" not in tasks[0].train_dataset.column_names


def test_unknown_task_keys_and_metrics_are_refused(tmp_path):
    config = _config("llava_vqa", tmp_path, [{"name": "v", "train_file": "a.json", "eval_file": "b.json", "metric": "bleu"}])
    with pytest.raises(ValueError, match="metric must be one of"):
        recipe_main("llava_vqa")([config])
    config = _config("llava_vqa", tmp_path, [{"name": "v", "train_file": "a.json", "eval_file": "b.json", "images": "x"}])
    with pytest.raises(ValueError, match=r"unknown keys \['images'\]"):
        recipe_main("llava_vqa")([config])
