"""A run directory is worked on by one runner at a time, and only resumed onto the base model it was learned on."""

from __future__ import annotations

import copy

import pytest
from transformers import TrainingArguments

from keeplora_hf import ContinualRunner

from toy_sequence import toy_model, toy_tasks


def _runner(out, **kwargs):
    model, tiny = toy_model()
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    return ContinualRunner(model, tasks, args, out, **kwargs)


def test_a_second_runner_on_the_same_directory_is_refused_until_the_first_ends(tmp_path):
    first = _runner(tmp_path / "run")
    with pytest.raises(RuntimeError, match="in use by another runner .pid"):
        _runner(tmp_path / "run")
    first.run()
    second = _runner(tmp_path / "run")  # the same command again: resumes the finished run
    assert second.run()["tasks"] == ["rule0"]


def test_resuming_onto_another_base_model_is_refused(tmp_path):
    from peft import get_peft_model

    from keeplora_hf.models import build_tiny

    _runner(tmp_path / "run").run()
    same, tiny = toy_model()
    other = build_tiny("llava", seed=1)
    model = get_peft_model(other.model, copy.deepcopy(same.peft_config["default"]))  # same config, other weights
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="not the one this adapter was trained on"):
        ContinualRunner(model, tasks, args, tmp_path / "run").run()


def test_a_full_disk_during_a_checkpoint_is_named(tmp_path, monkeypatch):
    import transformers

    runner = _runner(tmp_path / "run")

    def full_disk(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(transformers.Trainer, "train", full_disk)
    with pytest.raises(OSError, match="most likely a full disk.*resumes from its last complete checkpoint"):
        runner.run()
    assert (tmp_path / "run" / "row_000.json").is_file()  # what was written before is kept
