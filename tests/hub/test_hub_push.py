"""push_run: one commit with the adapter and its continual state, the plain LoRA, results, plots and our card."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file

from keeplora_hf.hub import HubOfflineError, load_run, push_run, render_card
from keeplora_hf.models import build_tiny

from conftest import FakeHfApi, fresh_base, logits, tree_digest

MAIN_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "plain_lora/adapter_config.json",
    "plain_lora/adapter_model.safetensors", "plain_lora/README.md", "plain_lora/keeplora_export.json",
    "results.json", "report.md", "heatmap_keeplora++.png",
    "accuracy_over_time_keeplora++.png", "run.json", "row_000.json", "tasks/001_rule0/row.json",
    "tasks/002_rule1/row.json",
}


def card_of(files: dict[str, bytes], tmp_path) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_bytes(files["README.md"])
    return ModelCard.load(path)


def matrix_lines(results: dict) -> list[str]:
    """The accuracy-matrix rows as the card must show them (in %, one decimal)."""
    matrix = results["methods"]["keeplora++"]["accuracy_matrix"]
    general = results["methods"]["keeplora++"]["general"]["general"]
    labels = ["zero-shot", *(f"after {t}" for t in results["tasks"])]
    return [
        "| " + " | ".join([label, *(f"{100 * v:.1f}" for v in [*row, general[i]])]) + " |"
        for i, (label, row) in enumerate(zip(labels, matrix))
    ]


def test_push_is_one_commit_with_adapter_state_export_results_plots_and_our_card(toy_run, tmp_path):
    before = tree_digest(toy_run)
    api = FakeHfApi()
    result = push_run(toy_run, "me/keeplora-toy", base_model=fresh_base(), api=api)

    assert [name for name, _ in api.calls if name == "create_commit"] == ["create_commit"]
    assert api.calls[0] == ("create_repo", {"repo_id": "me/keeplora-toy", "private": None, "exist_ok": True,
                                            "token": None, "repo_type": "model"})
    commit = api.commits[0]
    assert set(commit["added"]) == MAIN_FILES == set(result.files)
    assert commit["branch"] == "main" and commit["deleted"] == []
    final = toy_run / "tasks" / "002_rule1" / "adapter"
    assert commit["added"]["adapter_model.safetensors"] == (final / "adapter_model.safetensors").read_bytes()
    assert json.loads(commit["added"]["results.json"]) == json.loads((toy_run / "results.json").read_text())
    assert commit["added"]["heatmap_keeplora++.png"].startswith(b"\x89PNG")

    card = card_of(commit["added"], tmp_path)  # ours, not the generic card PEFT's save_pretrained writes
    assert card.data.library_name == "peft"
    assert {"keeplora", "lora", "continual-learning"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model is None  # a tiny model built from a config: no Hub id to name
    assert "More Information Needed" not in card.text and "# keeplora-toy" in card.text
    for line in matrix_lines(json.loads((toy_run / "results.json").read_text())):
        assert line in card.text
    assert "| `principal_energy` | `0.3` |" in card.text and "| `learning_rate` | `0.05` |" in card.text
    assert 'PeftModel.from_pretrained(base, "me/keeplora-toy", subfolder="plain_lora")' in card.text
    assert "import keeplora_hf" in card.text

    plain = json.loads(commit["added"]["plain_lora/adapter_config.json"])
    assert plain["peft_type"] == "LORA" and plain["r"] == 8  # 2 tasks x r=4
    assert tree_digest(toy_run) == before


def test_pushed_files_load_back_to_the_same_model(toy_run, tmp_path):
    api = FakeHfApi()
    push_run(toy_run, "me/keeplora-toy", base_model=fresh_base(), api=api)
    repo = api.materialize(tmp_path / "repo")
    tiny = build_tiny("llava")
    reference = logits(load_run(toy_run, fresh_base()), tiny)
    keeplora = PeftModel.from_pretrained(fresh_base(), str(repo))  # the root adapter, as the card says
    assert torch.equal(logits(keeplora, tiny), reference)
    plain = PeftModel.from_pretrained(fresh_base(), str(repo / "plain_lora"))  # a plain LoraConfig
    assert torch.allclose(logits(plain, tiny), reference, atol=1e-5)


def test_a_run_pushed_mid_sequence_shows_what_is_learned_so_far(toy_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("002_rule1", "results.json", "*.png", "report.md"))
    api = FakeHfApi()
    push_run(run, "me/toy", base_model=fresh_base(), api=api)
    files = api.commits[0]["added"]
    assert "tasks/002_rule1/row.json" not in files
    assert files["adapter_model.safetensors"] == (run / "tasks/001_rule0/adapter/adapter_model.safetensors").read_bytes()
    results = json.loads(files["results.json"])
    assert results["methods"]["keeplora++"]["accuracy_matrix"][2] == [None, None]
    card = card_of(files, tmp_path)
    assert "1 of 2 tasks" in card.text and "| after rule1 | – | – | – |" in card.text
    assert "| 2 | rule1 | not yet |" in card.text


def test_card_names_the_base_model_license_and_datasets(toy_run, tmp_path):
    card = render_card(toy_run, repo_id="me/x", base_model_id="llava-hf/llava-1.5-7b-hf", license="apache-2.0",
                       datasets=["me/ucit"])
    (tmp_path / "README.md").write_text(str(card))
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert "base_model:adapter:llava-hf/llava-1.5-7b-hf" in loaded.data.tags
    assert loaded.data.license == "apache-2.0" and loaded.data.datasets == ["me/ucit"]
    with pytest.raises(ValueError, match="not a Hub model id"):
        render_card(toy_run, base_model_id="/local/checkpoint")


@pytest.mark.parametrize("kind", ["branch", "tag"])
def test_per_task_revisions_hold_the_state_after_each_task(toy_run, tmp_path, kind):
    api = FakeHfApi()
    result = push_run(toy_run, "me/toy", base_model=fresh_base(), api=api, per_task_revisions=kind)
    assert list(result.revisions) == ["task-001-rule0", "task-002-rule1"]
    main, first, second = api.commits
    assert main["branch"] == "main"
    assert first["added"]["adapter_model.safetensors"] == (
        toy_run / "tasks" / "001_rule0" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert "tasks/002_rule1/row.json" in first["deleted"]  # inherited from main, not part of the state after task 1
    plain = json.loads(first["added"]["plain_lora/adapter_config.json"])
    assert plain["r"] == 4
    card = card_of(first["added"], tmp_path)
    assert "the state after task 1 of 2 (rule0)" in card.text and 'revision="task-001-rule0"' in card.text
    assert "| after rule1 | – | – | – |" in card.text
    assert second["added"]["adapter_model.safetensors"] == main["added"]["adapter_model.safetensors"]
    if kind == "branch":
        assert set(api.files) == {"main", "task-001-rule0", "task-002-rule1"}
    else:  # a tag per task on its own commit; the scratch branches are gone
        assert api.tags == {"task-001-rule0": first["oid"], "task-002-rule1": second["oid"]}
        assert set(api.files) == {"main"}


def test_a_second_push_replaces_our_files_and_keeps_the_others(toy_run):
    api = FakeHfApi()
    api.files["main"].update({"notes.txt": b"mine", "tasks/003_old/row.json": b"{}", "old.png": b"png"})
    push_run(toy_run, "me/toy", base_model=fresh_base(), api=api)
    assert sorted(api.commits[0]["deleted"]) == ["old.png", "tasks/003_old/row.json"]
    assert "notes.txt" in api.files["main"]


def test_offline_push_fails_before_doing_anything(toy_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree_digest(toy_run)
    api = FakeHfApi()
    message = r"(?s)offline \(HF_HUB_OFFLINE=1\).*Nothing was pushed.*keeplora-hf push"
    with pytest.raises(HubOfflineError, match=message):
        push_run(toy_run, "me/toy", base_model=fresh_base(), api=api)
    assert api.calls == []
    assert tree_digest(toy_run) == before


def test_a_failed_commit_changes_nothing_local(toy_run):
    before = tree_digest(toy_run)
    with pytest.raises(ConnectionError):
        push_run(toy_run, "me/toy", base_model=fresh_base(), api=FakeHfApi(fail_on_commit=True))
    assert tree_digest(toy_run) == before


@pytest.mark.parametrize("repo_id", ["a/b/c", "has space/x", "me/x--y", "me/x.git", "", "me/-x"])
def test_malformed_repo_id_is_refused_before_any_call(toy_run, repo_id):
    api = FakeHfApi()
    with pytest.raises(ValueError, match="malformed Hub repo id"):
        push_run(toy_run, repo_id, base_model=fresh_base(), api=api)
    assert api.calls == []


def _broken_copy(toy_run, tmp_path, breakage):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    breakage(run)
    return run


def _set_base_name(run, name):
    for config in run.glob("tasks/*/adapter/adapter_config.json"):
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = name
        config.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda run: [shutil.rmtree(p) for p in run.glob("tasks/*/adapter")],
         "incomplete run: no task has been learned"),
        (lambda run: (run / "run.json").unlink(), "not a KeepLoRA run: it has no run.json"),
        (lambda run: (run / "tasks" / "002_rule1" / "row.json").unlink(), "interrupted during evaluation"),
        (lambda run: (run / "tasks/002_rule1/adapter/adapter_model.safetensors").unlink(), "lacks adapter_model"),
        (lambda run: (run / "tasks" / "007_other").mkdir(), "mixes runs"),
        (lambda run: (run / "run.json").write_text("{"), "not valid JSON"),
        (lambda run: shutil.copytree(run / "tasks/001_rule0/adapter", run / "tasks/002_rule1/adapter",
                                     dirs_exist_ok=True),
         "holds 1 tasks: the run directory is inconsistent"),
    ],
)
def test_incomplete_or_inconsistent_run_is_refused(toy_run, tmp_path, breakage, message):
    run = _broken_copy(toy_run, tmp_path, breakage)
    api = FakeHfApi()
    with pytest.raises(ValueError, match=message):
        push_run(run, "me/toy", base_model=fresh_base(), api=api)
    assert api.calls == []


def test_run_from_another_base_model_is_refused(toy_run, tmp_path):
    with pytest.raises(ValueError, match="learned on a LlavaForConditionalGeneration, but .* Qwen2VLForConditional"):
        load_run(toy_run, build_tiny("qwen2_vl").model)  # same layer names and shapes, another model
    with pytest.raises(ValueError, match="not the one .* was learned on: the principal (energies|basis) saved for"):
        load_run(toy_run, build_tiny("llava", seed=1).model)  # same class and shapes, other weights (see below)
    with pytest.raises(ValueError, match="already carries adapters"):
        load_run(toy_run, load_run(toy_run, fresh_base()))
    run = _broken_copy(toy_run, tmp_path, lambda run: _set_base_name(run, "org/model-a"))
    other = fresh_base()
    other.config._name_or_path = "org/model-b"
    with pytest.raises(ValueError, match="learned on the base model 'org/model-a'.*'org/model-b'"):
        push_run(run, "me/toy", base_model=other, api=FakeHfApi())
    with pytest.raises(ValueError, match="records no base model"):
        push_run(toy_run, "me/toy", api=FakeHfApi())  # nothing to rebuild the plain-LoRA export from


def _saved_principal(run, after_task: int) -> dict[str, torch.Tensor]:
    adapter = next(run.glob(f"tasks/{after_task:03d}_*/adapter/adapter_model.safetensors"))
    return {k: v for k, v in load_file(adapter).items() if k.endswith("keeplora_state.principal")}


@pytest.mark.parametrize(
    ("run", "after_task", "layouts", "misfit"),
    [
        # the default keeps only the energies of layers that store their complement: both checked layers after 2 tasks
        ("toy_run", 2, {1}, "the principal energies saved for model.language_model.layers.0.mlp.down_proj are not "
                            "that layer's top 4 squared singular values"),
        ("toy_run", 1, {1, 2}, "the principal basis saved for model.language_model.layers.0.mlp.down_proj"),
        ("toy_run_with_bases", 2, {2}, "the principal basis saved for model.language_model.layers.0.mlp.down_proj is "
                                       "not made of singular vectors"),
    ],
    ids=["energies", "mixed", "bases"],
)
def test_a_base_of_the_same_shapes_is_checked_in_both_state_layouts(request, run, after_task, layouts, misfit):
    """`principal` is a layer's (d_in, p) basis, or its (p,) energies once only the complement is stored: the original
    base passes either check and another model of the same class and shapes fails it, naming the layer."""
    run = request.getfixturevalue(run)
    saved = _saved_principal(run, after_task)
    checked = sorted(saved)[:: len(saved) - 1]  # the first and last layers
    assert {saved[k].ndim for k in checked} == layouts
    assert load_run(run, fresh_base(), after_task=after_task).base_model.progress("default").task_index == after_task
    with pytest.raises(ValueError, match=re.escape(misfit)):
        load_run(run, build_tiny("llava", seed=1).model, after_task=after_task)


def test_principal_energies_accept_a_rounded_base_and_refuse_another():
    """The energies check at a realistic width: the same weight rounded to bfloat16 moves them ~1e-5 of the largest,
    within the tolerance; another weight of the same shape and statistics moves them ~1e-2, outside it."""
    from keeplora_hf.hub.load import _energies_misfit
    from keeplora_hf.subspace import principal_basis

    weights = [torch.randn(512, 1024, generator=torch.Generator().manual_seed(seed)) * 0.02 for seed in (0, 1)]
    _, energies = principal_basis(weights[0], 0.6, return_energies=True)  # the default "gram" solver, in float32
    assert _energies_misfit("layer", energies, weights[0]) is None
    assert _energies_misfit("layer", energies, weights[0].bfloat16()) is None
    assert "principal energies saved for layer are not" in _energies_misfit("layer", energies, weights[1])
    assert "saves 1025 principal energies" in _energies_misfit("layer", torch.ones(1025), weights[0])


def test_live_model_at_another_task_is_refused(toy_run):
    model = load_run(toy_run, fresh_base(), after_task=1)
    with pytest.raises(ValueError, match="has learned 1 task.*has learned 2"):
        push_run(toy_run, "me/toy", model=model, api=FakeHfApi())
    with pytest.raises(ValueError, match="per_task_revisions must be"):
        push_run(toy_run, "me/toy", model=model, api=FakeHfApi(), per_task_revisions="commit")
