"""One runner at a time in a run directory: a second one is refused while the first holds the directory's lock."""

from __future__ import annotations

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
