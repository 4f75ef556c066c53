"""Saving, reloading and exporting carry the whole continual state, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from keeplora_hf import begin_task, end_task, export_lora
from keeplora_hf.models import build_tiny
from peft import PeftModel

from keeplora_setups import learn, outputs, targets, wrap


def _two_tasks(name: str, **overrides):
    model, batches, tiny = wrap(name, **overrides)
    for task in (batches[:2], batches[1:]):
        begin_task(model, task)
        learn(model, task)
        end_task(model, task)
    return model, batches, tiny


@pytest.mark.parametrize(("name", "keep_principal_basis"), [("llava", False), ("clip", False), ("llava", True)])
def test_save_load_round_trip_gives_identical_logits_and_state(tmp_path, name, keep_principal_basis):
    model, batches, tiny = _two_tasks(name, keep_principal_basis=keep_principal_basis)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert int(saved["keeplora_state.task_index"].item()) == 2
    principal = {k: v for k, v in saved.items() if k.endswith("keeplora_state.principal")}
    # the (d_in, p) basis, or, by default, the (p,) energies of a layer that stores only its complement
    assert principal and {v.ndim for v in principal.values()} == ({2} if keep_principal_basis else {1, 2})
    assert any(k.endswith("keeplora_state.task1.lora_A") for k in saved)

    reloaded = PeftModel.from_pretrained(build_tiny(name).model, tmp_path)
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))
    assert reloaded.base_model.progress("default").task_index == 2
    for (name_a, a), (name_b, b) in zip(targets(model).items(), targets(reloaded).items()):
        assert name_a == name_b
        sa, sb = a.keeplora_state["default"], b.keeplora_state["default"]
        assert repr(sa) == repr(sb)  # the same layout, ranks and task count
        assert torch.equal(sa.principal, sb.principal) and torch.equal(sa.memory, sb.memory)
        assert torch.equal(a.get_base_layer().weight, b.get_base_layer().weight)


def test_reloaded_model_continues_the_sequence_exactly(tmp_path):
    model, batches, _ = _two_tasks("llava")
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model, tmp_path, is_trainable=True)
    for m in (model, reloaded):
        torch.manual_seed(0)
        begin_task(m, batches)
        learn(m, batches)
        end_task(m, batches)
    assert torch.equal(outputs(reloaded, batches[2]), outputs(model, batches[2]))


def test_save_in_the_middle_of_a_task_resumes_that_task(tmp_path):
    model, batches, _ = wrap("qwen2_vl")
    begin_task(model, batches)
    learn(model, batches)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("qwen2_vl").model, tmp_path, is_trainable=True)
    assert reloaded.base_model.progress("default").in_task
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))
    end_task(reloaded, batches)  # allowed: the task was under way when saved
    end_task(model, batches)
    assert torch.equal(outputs(reloaded, batches[0]), outputs(model, batches[0]))


@pytest.mark.parametrize("in_task", [False, True], ids=["between_tasks", "during_task"])
def test_export_lora_loads_with_plain_peft_and_gives_the_same_logits(tmp_path, in_task):
    model, batches, _ = _two_tasks("llava")
    if in_task:
        begin_task(model, batches)
        learn(model, batches)
    export_lora(model, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == (12 if in_task else 8) and not config["rank_pattern"]
    expected = outputs(model, batches[0])
    torch.save({"batch": batches[0], "expected": expected}, tmp_path / "probe.pt")
    build_tiny("llava").model.save_pretrained(tmp_path / "base")  # the original pre-trained weights

    # a fresh interpreter that never imports keeplora_hf, as vLLM or any LoRA consumer would load it
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel, LoraConfig
        from transformers import LlavaForConditionalGeneration
        base = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "plain")!r})
        assert not any(name.startswith("keeplora_hf") for name in sys.modules)
        assert isinstance(model.peft_config["default"], LoraConfig)
        probe = torch.load({str(tmp_path / "probe.pt")!r})
        with torch.no_grad():
            logits = model(**probe["batch"]).logits
        print("max-abs-diff", (logits - probe["expected"]).abs().max().item())
        assert torch.allclose(logits, probe["expected"], atol=1e-5, rtol=1e-5)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
