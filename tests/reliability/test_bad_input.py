"""Bad input and misuse get a clear error that names the problem, and nothing already learned or saved is lost."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from peft import get_peft_model

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, export_lora
from keeplora_hf.continual.checkpoint import atomic_directory, atomic_write_json
from keeplora_hf.models import build_tiny


def _model(**overrides):
    tiny = build_tiny("llava")
    settings = dict(r=4, lora_alpha=8, target_modules=tiny.language_targets, gradient_data_ratio=1.0)
    model = get_peft_model(tiny.model, KeepLoRAConfig(**{**settings, **overrides}))
    return model, [tiny.make_batch(2, seed) for seed in range(2)]


def _learn(model, batches, steps: int = 2) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


# -- configs that would break the method ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("init_lora_weights", "pissa", "init_lora_weights='pissa' is not supported"),
        ("init_lora_weights", "olora", "init_lora_weights='olora' is not supported"),
        ("bias", "all", "bias='all' is not supported"),
        ("principal_energy", float("nan"), "principal_energy must be a number"),
        ("feature_energy", float("nan"), "feature_energy must be a number"),
        ("lora_alpha", -8, "lora_alpha must be a positive number"),
        ("lora_alpha", "x", "lora_alpha must be a positive number"),
        ("r", True, "r must be a positive integer"),
    ],
)
def test_configs_that_break_the_method_are_refused_by_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        KeepLoRAConfig(target_modules=["q_proj"], **{field: value})


# -- misuse of the lifecycle --------------------------------------------------------------------------------------


def test_a_trained_A_that_was_never_reprojected_is_refused_at_end_task():
    model, batches = _model(train_lora_A=True)
    begin_task(model, batches)
    _learn(model, batches)  # a custom loop without attach_residual_projection
    with pytest.raises(RuntimeError, match="left its residual subspace.*attach_residual_projection"):
        end_task(model, batches)
    progress = model.base_model.progress("default")
    assert progress.in_task and progress.task_index == 0  # nothing was finished


def test_unsupervised_batches_are_refused_before_anything_changes():
    model, batches = _model()
    for batch in batches:
        batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="every batch has all its labels -100"):
        begin_task(model, batches)
    assert not model.base_model.progress("default").in_task
    assert all(not m.keeplora_state["default"].initialised for m in model.modules() if hasattr(m, "keeplora_state"))


def test_a_batch_with_nothing_supervised_is_skipped_with_a_warning():
    model, batches = _model()
    cut = {**batches[1], "labels": torch.full_like(batches[1]["labels"], -100)}  # e.g. an answer cut by max_length
    with pytest.warns(UserWarning, match="skipped 1 of 2 batches whose labels are all -100"):
        begin_task(model, [batches[0], cut])
    assert model.base_model.progress("default").in_task


def test_non_finite_inputs_at_end_task_name_the_cause_and_keep_the_state():
    model, batches = _model()
    begin_task(model, batches)
    _learn(model, batches)
    poisoned = [{**b, "pixel_values": torch.full_like(b["pixel_values"], float("nan"))} for b in batches]
    with pytest.raises(ValueError, match="NaN/inf"):
        end_task(model, poisoned)
    assert model.base_model.progress("default").in_task
    end_task(model, batches)  # the task can still be finished with good data
    assert model.base_model.progress("default").task_index == 1


# -- the export never destroys anything --------------------------------------------------------------------------


def _learned_model():
    """A tiny model after one finished task, and its batches."""
    model, batches = _model()
    begin_task(model, batches)
    _learn(model, batches)
    end_task(model, batches)
    return model, batches


def test_export_refuses_a_non_empty_target_and_never_replaces_a_run(tmp_path):
    model, batches = _learned_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_lora(model, target)
    with pytest.raises(FileExistsError, match=r"not a previous export \(in the way: notes.txt\)"):
        export_lora(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a continual run"):
        export_lora(model, run, overwrite=True)
    assert (run / "run.json").read_text() == "{}"


def test_overwrite_replaces_only_a_previous_export(tmp_path):
    model, batches = _learned_model()
    holder = tmp_path / "runs"
    (holder / "seq1").mkdir(parents=True)  # a run one level down
    (holder / "seq1" / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="in the way: seq1"):
        export_lora(model, holder, overwrite=True)
    assert (holder / "seq1" / "run.json").read_text() == "{}"

    export = tmp_path / "export"
    export_lora(model, export)
    first = (export / "adapter_model.safetensors").read_bytes()
    begin_task(model, batches)
    _learn(model, batches)  # the task under way is exported too
    export_lora(model, export, overwrite=True)  # a previous export: replaced
    assert (export / "adapter_model.safetensors").read_bytes() != first
    mask = os.umask(0)
    os.umask(mask)
    for file in export.iterdir():  # the mode a plain open() gives, not safetensors' 0600
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name


def test_export_run_refuses_to_write_into_the_run_it_reads(tmp_path, monkeypatch):
    from keeplora_hf import hub
    from keeplora_hf.hub import seed

    class Info:
        root = tmp_path / "run"
        source = "runs/x"

    Info.root.mkdir()
    monkeypatch.setattr(seed, "open_run", lambda *a, **k: Info)
    for out in (Info.root, Info.root / "export", tmp_path):
        with pytest.raises(ValueError, match="is the run"):
            hub.export_run(Info.root, out)
    assert Info.root.is_dir()


# -- written files can be read by the other users of a shared machine -------------------------------------------


def test_atomic_writes_get_the_default_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        with atomic_directory(tmp_path / "adapter") as staging:
            (staging / "file").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}


# -- every load path checks the base model and the state's integrity --------------------------------------------


def _saved(tmp_path):
    model, batches = _learned_model()
    model.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors", batches


def _load(path, base=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(base if base is not None else build_tiny("llava").model, path.parent)


def test_a_different_base_model_is_refused_naming_the_layer(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    other = build_tiny("llava", seed=1).model
    with pytest.raises(ValueError, match=r"not the one this adapter was trained on: the pre-trained weight of .*layers\.0"):
        _load(path, other)
    monkeypatch.setenv("KEEPLORA_TRUST_BASE", "1")  # the opt-out for users who know
    _load(path, build_tiny("llava", seed=1).model)


def test_the_same_base_cast_to_bfloat16_is_accepted(tmp_path):
    path, batches = _saved(tmp_path)
    reloaded = _load(path, build_tiny("llava").model.to(torch.bfloat16))
    assert reloaded.base_model.progress("default").task_index == 1


def _edit(path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("stripped", lambda t: [t.pop(k) for k in [k for k in t if "keeplora_state" in k]], "holds no KeepLoRA state"),
        ("task_index_edited", lambda t: t.__setitem__("keeplora_state.task_index", torch.tensor([0])), "checksum"),
        ("flipped_bytes", lambda t: next(v for k, v in t.items() if k.endswith("task0.lora_B")).view(torch.uint8)[3].bitwise_not_(), "checksum"),
    ],
)
def test_a_tampered_state_is_refused(tmp_path, case, change, message):
    path, _ = _saved(tmp_path)
    _edit(path, change)
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_a_state_listing_tasks_beyond_its_task_index_is_refused(tmp_path):
    from keeplora_hf.tuner.state_io import state_checksum

    path, _ = _saved(tmp_path)

    def lower_index(tensors):
        tensors["keeplora_state.task_index"] = torch.tensor([0])
        tensors["keeplora_state.checksum"] = state_checksum(tensors)  # crafted consistently, not corrupted

    _edit(path, lower_index)
    with pytest.raises(ValueError, match="the file is corrupt"):
        _load(path)
