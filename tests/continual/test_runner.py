"""The runner learns a sequence, writes its outputs, validates input, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from keeplora_hf.continual import ContinualRunner, ContinualTask
from keeplora_hf.tuner.state import KeepLoRALayerState

from toy_sequence import toy_model, toy_tasks


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "unused"),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=5e-2,
        logging_steps=2,
        save_strategy="steps",
        save_steps=4,
        report_to=["tensorboard"],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_runner_writes_matrix_metrics_plots_and_checkpoints(tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("the training path recomputed a principal basis (an SVD per layer)")

    # the default config keeps only the complement of a wide protected subspace: nothing in a run may recompute it
    monkeypatch.setattr(KeepLoRALayerState, "_recomputed_principal", refuse)
    model, tiny = toy_model()
    tasks, general = toy_tasks(tiny)
    out = tmp_path / "run"
    results = ContinualRunner(model, tasks, training_args(tmp_path), out, general_sets=general).run()

    method = results["methods"]["keeplora++"]
    matrix = method["accuracy_matrix"]
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
    assert matrix[1][0] > matrix[0][0]  # learned task 1
    assert matrix[2][1] > matrix[0][1]  # learned task 2
    assert set(method["metrics"]) >= {"transfer", "avg", "last", "mft", "mfn", "maa", "bwt", "fwt", "forgetting"}
    assert method["general"]["general"][0] is not None
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"]["keeplora++"]["accuracy_matrix"] == matrix
    assert (out / "tasks" / "001_rule0" / "adapter" / "adapter_model.safetensors").exists()
    last = load_file(out / "tasks" / "002_rule1" / "adapter" / "adapter_model.safetensors")
    assert any(v.ndim == 1 for k, v in last.items() if k.endswith("keeplora_state.principal"))  # energies only
    assert (out / "tasks" / "002_rule1" / "row.json").exists()
    assert list(out.glob("*.png")) and (out / "report.md").exists()
    assert list((out / "trainer" / "001_rule0").rglob("events.out.tfevents.*"))
    assert not list((out / "trainer").rglob("checkpoint-*"))  # mid-task checkpoints go once a task is done


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda tasks: tasks + [tasks[0]], "repeated"),
        (lambda tasks: [ContinualTask("empty", [], tasks[0].eval_dataset, tasks[0].metric)], "'empty': the train dataset is empty"),
        (lambda tasks: [ContinualTask("holes", tasks[0].train_dataset, [{"a": 1}, {"a": None}], tasks[0].metric)], "row 1 has no value for field 'a'"),
        (lambda tasks: [ContinualTask("a/b", tasks[0].train_dataset, tasks[0].eval_dataset, tasks[0].metric)], "cannot name a directory"),
    ],
)
def test_bad_sequences_are_refused_before_training(tmp_path, mutate, message):
    model, tiny = toy_model()
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    with pytest.raises(ValueError, match=message):
        ContinualRunner(model, mutate(tasks), training_args(tmp_path), tmp_path / "run")
    assert not (tmp_path / "run" / "tasks").exists()


def test_metric_that_returns_no_number_is_caught_at_row_zero(tmp_path):
    model, tiny = toy_model()
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    tasks[0].metric = lambda model, data: "high"
    with pytest.raises(ValueError, match="metric of 'rule0' returned 'high', not a number"):
        ContinualRunner(model, tasks, training_args(tmp_path), tmp_path / "run").run()
    assert not (tmp_path / "run" / "tasks").exists()


def test_output_dir_with_another_run_is_refused_unless_overwrite(tmp_path):
    model, tiny = toy_model()
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    ContinualRunner(model, tasks, training_args(tmp_path), tmp_path / "run")
    model, tiny = toy_model()
    with pytest.raises(ValueError, match="different configuration .*training"):
        ContinualRunner(model, tasks, training_args(tmp_path, learning_rate=1e-3), tmp_path / "run")
    ContinualRunner(model, tasks, training_args(tmp_path, learning_rate=1e-3), tmp_path / "run", overwrite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_model_partitioned_before_the_run_is_refused(tmp_path, device, dtype):
    """A ZeRO-3 `zero.Init` load leaves every weight empty until DeepSpeed's first `train()` installs its gathering
    hooks, after the runner's first evaluation: refused up front with what to do (the marker DeepSpeed sets is faked)."""
    model, tiny = toy_model(dtype)
    model.to(device)
    tasks, _ = toy_tasks(tiny, count=1, train_size=8)
    next(model.parameters()).ds_id = 0
    with pytest.raises(ValueError, match="already partitioned by DeepSpeed ZeRO-3.*zero3_init_flag: false"):
        ContinualRunner(model, tasks, training_args(tmp_path), tmp_path / "run")
    assert not (tmp_path / "run").exists()
