"""hub.continue_from and hub.run_and_push: a ContinualRunner continues a saved run, then pushes the result."""

from __future__ import annotations

import json

import pytest

import keeplora_hf.hub.push as hub_push
from keeplora_hf.continual import ContinualRunner
from keeplora_hf.hub import continue_from, run_and_push

from conftest import FakeHfApi, toy_tasks, training_args
from toy_sequence import toy_model


@pytest.mark.slow
def test_runner_continues_a_saved_run_and_pushes_the_result(toy_run, tmp_path, monkeypatch):
    api = FakeHfApi()
    monkeypatch.setattr(hub_push, "HfApi", lambda token=None: api)
    model, tiny = toy_model()
    tasks, general = toy_tasks(tiny, 3)
    out = continue_from(toy_run, tmp_path / "continued", tasks)
    runner = ContinualRunner(model, tasks, training_args(tmp_path), out, general_sets=general)
    results = run_and_push(runner, "me/toy", per_task_revisions=True)
    assert runner.learned == 3 and results["tasks"] == ["rule0", "rule1", "rule2"]
    assert [c["branch"] for c in api.commits] == ["main", "task-001-rule0", "task-002-rule1", "task-003-rule2"]
    pushed = json.loads(api.files["main"]["results.json"])
    assert pushed["methods"]["keeplora++"]["accuracy_matrix"] == results["methods"]["keeplora++"]["accuracy_matrix"]
    assert b"**Continued from:** a local run (`run`)" in api.files["main"]["README.md"]
    with pytest.raises(ValueError, match="malformed Hub repo id"):
        run_and_push(ContinualRunner(model, tasks, training_args(tmp_path), tmp_path / "other"), "bad id")
