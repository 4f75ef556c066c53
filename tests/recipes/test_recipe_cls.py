"""KeepLoRA++cls in the CLIP recipe (`classifier_heads: true`): a head per task, saved with each task's adapter,
earlier heads unchanged by later tasks, each task evaluated with its own head; off by default."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recipe_helpers import check_results, recipe_main, tiny_args

CLIP_TASKS = ["primary", "secondary"]


def _heads(run, index: int, name: str) -> dict[str, torch.Tensor]:
    saved = load_file(str(run / "tasks" / f"{index:03d}_{name}" / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in saved.items() if k.startswith("keeplora_heads.")}


def test_clip_tiny_with_classifier_heads(tmp_path, one_thread):
    results = recipe_main("clip_mtil")(tiny_args("clip_mtil", tmp_path, "--classifier_heads", "true"))
    run = tmp_path / "run"
    check_results(run, CLIP_TASKS)
    assert results["config"]["recipe"]["classifier_heads"] is True
    first, second = _heads(run, 1, "primary"), _heads(run, 2, "secondary")
    assert sorted(k for k in first if k.endswith(".weight")) == ["keeplora_heads.task0.weight"]
    assert first["keeplora_heads.task0.weight"].shape == (3, 32)  # red, green, blue over the tiny CLIP's features
    assert second["keeplora_heads.task1.weight"].shape == (3, 32)
    assert bytes(second["keeplora_heads.task1.name"].tolist()).decode() == "secondary"
    assert torch.equal(second["keeplora_heads.task0.weight"], first["keeplora_heads.task0.weight"])  # frozen
    # trained: the class means it started from are unit rows
    assert (first["keeplora_heads.task0.weight"].norm(dim=1) - 1).abs().max() > 1e-5
    # the same command again resumes the finished run: its heads load with its adapters and give the same rows
    again = recipe_main("clip_mtil")(tiny_args("clip_mtil", tmp_path, "--classifier_heads", "true"))
    assert again["methods"]["keeplora++"]["accuracy_matrix"] == results["methods"]["keeplora++"]["accuracy_matrix"]


def test_heads_are_off_by_default_and_for_clip_only(tmp_path, one_thread):
    results = recipe_main("clip_mtil")(tiny_args("clip_mtil", tmp_path, "--num_train_epochs", "1"))
    assert "classifier_heads" not in results["config"]["recipe"]
    assert not _heads(tmp_path / "run", 1, "primary")
    with pytest.raises(ValueError, match="classifier_heads is KeepLoRA\\+\\+cls, for CLIP classification"):
        recipe_main("llava_vqa")(tiny_args("llava_vqa", tmp_path / "vqa", "--classifier_heads", "true"))
