"""Exports that servers load exactly: vLLM's and SGLang's LoRA loaders read only `r`, `lora_alpha`, `target_modules` and
`use_rslora` from `adapter_config.json` and scale every layer by `lora_alpha / r`; the merged checkpoint loads with
`from_pretrained`; the language-model-only LoRA on its merged base reproduces the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig

from keeplora_hf import begin_task, end_task
from keeplora_hf.export import MERGED_BASE_DIR, export_lora, export_merged
from keeplora_hf.models import build_tiny
from keeplora_hf.serving_check import apply_like_a_server

from keeplora_setups import learn, outputs, wrap

DTYPES = [torch.float32, torch.bfloat16]
#: two architectures with a vision tower targeted; layer scaling on (the default gamma); one with per-layer ranks, so
#: the export pads layers to one rank
CASES = {
    "llava": {},
    "qwen2_vl": {"rank_pattern": {"k_proj": 2}},
}


def _two_tasks(name: str, dtype: torch.dtype, device: str = "cpu", **overrides):
    model, batches, _ = wrap(name, dtype=dtype, device=device, **overrides)
    for picks in ([0, 1], [1, 2]):
        task = [batches[i] for i in picks]
        begin_task(model, task)
        learn(model, task)
        end_task(model, task)
    return model, batches


def serve_like_vllm(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The LoRA applied as vLLM's and SGLang's loaders do (`keeplora_hf.serving_check`), after checking the one rank
    every layer must have."""
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in load_file(folder / "adapter_model.safetensors").items():
        assert value.shape[0 if ".lora_A." in key else 1] == config["r"], key
    return apply_like_a_server(base, folder)


def _tolerance(expected: torch.Tensor) -> float:
    """1e-5 relative in float32; one rounding step of the largest logit in a 16-bit dtype."""
    scale = expected.float().abs().max().item()
    return 1e-5 * scale if expected.dtype == torch.float32 else torch.finfo(expected.dtype).eps * scale


def _gap(found: torch.Tensor, expected: torch.Tensor) -> float:
    return (found.float() - expected.float()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_server_style_loader_gives_the_keeplora_logits(tmp_path, device, name, dtype):
    model, batches = _two_tasks(name, dtype, device, **CASES[name])
    expected = outputs(model, batches[0])
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"] and not config["modules_to_save"]
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["bias"] == "none"
    assert f"--max-lora-rank {config['r']}" in (tmp_path / "lora" / "README.md").read_text()

    served = serve_like_vllm(build_tiny(name).model.to(device=device, dtype=dtype), tmp_path / "lora")
    assert _gap(outputs(served, batches[0]), expected) <= _tolerance(expected)
    plain = PeftModel.from_pretrained(build_tiny(name).model.to(device=device, dtype=dtype), tmp_path / "lora")  # plain PEFT, exactly too
    assert _gap(outputs(plain, batches[0]), expected) <= _tolerance(expected)


#: a checkpoint merged into 16-bit weights rounds each weight once (W + delta), where the model adds its float32
#: updates to the layer's output: measured 1.4 (llava) and 2.4 (qwen2_vl) rounding steps of the largest logit
MERGED_STEPS_16BIT = 4


def _merged_tolerance(expected: torch.Tensor) -> float:
    return _tolerance(expected) * (1 if expected.dtype == torch.float32 else MERGED_STEPS_16BIT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_merged_checkpoint_is_merge_and_unload_and_loads_with_from_pretrained(tmp_path, device, name, dtype):
    projector = ["multi_modal_projector"] if name == "llava" else None
    model, batches = _two_tasks(name, dtype, device, modules_to_save=projector)
    expected = outputs(model, batches[0])
    model_class = type(build_tiny(name).model)
    export_merged(model, tmp_path / "merged")
    merged = model_class.from_pretrained(tmp_path / "merged", dtype=dtype).to(device)
    found = outputs(merged, batches[0])
    assert _gap(found, expected) <= _merged_tolerance(expected)
    reference = model.merge_and_unload().state_dict()  # exactly PEFT's own merge, weight for weight
    assert all(torch.equal(value, reference[key].to(value.device)) for key, value in merged.state_dict().items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_language_model_lora_on_its_merged_base_reproduces_the_model(tmp_path, name, dtype):
    model, batches = _two_tasks(name, dtype, modules_to_save=["multi_modal_projector"] if name == "llava" else None)
    expected = outputs(model, batches[0])
    export_lora(model, tmp_path / "lm", language_model_only=True)
    targets = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert AutoConfig.from_pretrained(tmp_path / "lm" / MERGED_BASE_DIR).model_type == model.config.model_type
    base = type(build_tiny(name).model).from_pretrained(tmp_path / "lm" / MERGED_BASE_DIR, dtype=dtype)
    served = serve_like_vllm(base, tmp_path / "lm")
    assert _gap(outputs(served, batches[0]), expected) <= _merged_tolerance(expected)


def test_every_tiny_architecture_exports_what_it_computes(tmp_path, tiny_name):
    """All three forms on every architecture, CLIP (a parameter of the model itself: logit_scale) included."""
    model, batches = _two_tasks(tiny_name, torch.float32)
    expected = outputs(model, batches[0])
    model_class = type(build_tiny(tiny_name).model)
    export_lora(model, tmp_path / "lora")
    served = serve_like_vllm(build_tiny(tiny_name).model, tmp_path / "lora")
    assert _gap(outputs(served, batches[0]), expected) <= _tolerance(expected)
    export_merged(model, tmp_path / "merged")
    assert _gap(outputs(model_class.from_pretrained(tmp_path / "merged"), batches[0]), expected) <= _tolerance(expected)
    export_lora(model, tmp_path / "lm", language_model_only=True)
    base = model_class.from_pretrained(tmp_path / "lm" / MERGED_BASE_DIR)
    assert _gap(outputs(serve_like_vllm(base, tmp_path / "lm"), batches[0]), expected) <= _tolerance(expected)


def test_a_fully_trained_module_is_refused_in_a_lora_and_kept_in_the_merged_base(tmp_path):
    model, batches = _two_tasks("llava", torch.float32, modules_to_save=["multi_modal_projector"])
    with pytest.raises(ValueError, match=r"modules_to_save \['multi_modal_projector'\].*language_model_only"):
        export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    export_lora(model, tmp_path / "lm", language_model_only=True)
    base = type(build_tiny("llava").model).from_pretrained(tmp_path / "lm" / MERGED_BASE_DIR)
    trained = model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_1.weight
    assert torch.equal(base.model.multi_modal_projector.linear_1.weight, trained.detach())
