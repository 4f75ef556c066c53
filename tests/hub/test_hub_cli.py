"""`keeplora-hf push` and `keeplora-hf export` (registered here the way keeplora_hf.cli registers them)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel

import keeplora_hf.hub.push as hub_push
from keeplora_hf.cli.push import add_export_parser, add_push_parser
from keeplora_hf.models import build_tiny

from conftest import FakeHfApi, fresh_base, logits, tree_digest


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="keeplora-hf")
    sub = parser.add_subparsers(dest="command", required=True)
    add_push_parser(sub)
    add_export_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The toy run's base model saved as a checkpoint, as a real run's base would be given on the command line."""
    path = tmp_path_factory.mktemp("base") / "tiny-llava"
    fresh_base().save_pretrained(path)
    return path


def test_export_writes_the_plain_lora_of_the_first_k_tasks(toy_run, base_dir, tmp_path, capsys):
    """Checked against the run's own adapter after task 1, loaded by PEFT alone: the plain LoRA on the fresh base
    must compute what that adapter computes, and not what the adapter after task 2 computes."""
    main(["export", str(toy_run), str(tmp_path / "lora"), "--after-task", "1", "--base-model", str(base_dir)])
    assert "rank 4" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4  # 1 task x r=4
    tiny = build_tiny("llava")
    exported = logits(PeftModel.from_pretrained(fresh_base(), str(tmp_path / "lora")), tiny)
    task_dirs = sorted((toy_run / "tasks").iterdir())  # 001_rule0, 002_rule1
    after_1, after_2 = (logits(PeftModel.from_pretrained(fresh_base(), str(d / "adapter")), tiny) for d in task_dirs)
    assert torch.allclose(exported, after_1, atol=1e-5)
    assert not torch.allclose(exported, after_2, atol=1e-5)


def test_export_merged_and_language_model_only_from_the_command_line(toy_run, base_dir, tmp_path, capsys):
    """`--merged`: a checkpoint from_pretrained loads, computing what the run's last adapter computes;
    `--language-model-only`: the language model's LoRA beside a merged base; both carry the base's processor files."""
    from transformers import LlavaForConditionalGeneration

    (base_dir / "tokenizer_config.json").write_text("{}")  # a processor file the base folder has
    tiny = build_tiny("llava")
    last = sorted((toy_run / "tasks").iterdir())[-1] / "adapter"
    expected = logits(PeftModel.from_pretrained(fresh_base(), str(last)), tiny)

    main(["export", str(toy_run), str(tmp_path / "merged"), "--merged", "--base-model", str(base_dir)])
    assert "merged checkpoint" in capsys.readouterr().out
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    merged = logits(LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged"), tiny)
    assert torch.allclose(merged, expected, atol=1e-5)

    main(["export", str(toy_run), str(tmp_path / "lm"), "--language-model-only", "--base-model", str(base_dir)])
    config = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())
    assert all(t.startswith("model.language_model.") for t in config["target_modules"])
    assert (tmp_path / "lm" / "base_model" / "tokenizer_config.json").is_file()
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "lm" / "base_model")
    served = logits(PeftModel.from_pretrained(base, str(tmp_path / "lm")), tiny)
    assert torch.allclose(served, expected, atol=1e-5)


def test_export_without_a_base_model_says_how_to_give_one(toy_run, tmp_path):
    with pytest.raises(SystemExit, match="records no base model.*--base-model"):
        main(["export", str(toy_run), str(tmp_path / "lora")])
    with pytest.raises(SystemExit, match="after_task must be a learned task index"):
        main(["export", str(toy_run), str(tmp_path / "lora"), "--after-task", "0"])
    assert not (tmp_path / "lora").exists()


def test_push_from_the_command_line(toy_run, base_dir, tmp_path, monkeypatch, capsys):
    api = FakeHfApi()
    monkeypatch.setattr(hub_push, "HfApi", lambda token=None: api)
    main(["push", str(toy_run), "me/toy", "--base-model", str(base_dir), "--per-task-revisions", "--private",
          "--base-model-id", "llava-hf/llava-1.5-7b-hf", "--license", "apache-2.0", "--dataset", "me/ucit"])
    out = capsys.readouterr().out
    assert "pushed 15 files to me/toy" in out and "revision task-002-rule1" in out
    assert api.calls[0][1]["private"] is True
    (tmp_path / "README.md").write_bytes(api.files["main"]["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf" and card.data.license == "apache-2.0"
    assert set(api.files) == {"main", "task-001-rule0", "task-002-rule1"}


def test_push_offline_or_to_a_malformed_repo_fails_clearly(toy_run, monkeypatch):
    before = tree_digest(toy_run)
    with pytest.raises(SystemExit, match="malformed Hub repo id 'not a repo'"):
        main(["push", str(toy_run), "not a repo"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=rf"(?s)Hub is offline.*HF_HUB_OFFLINE=0 keeplora-hf push {toy_run} me/toy"):
        main(["push", str(toy_run), "me/toy"])
    assert tree_digest(toy_run) == before
