"""Recipe arguments: YAML plus overrides, complete real-checkpoint configs, GPU options and what is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model

from keeplora_hf.continual.generation import NORMALIZERS
from keeplora_hf.models import build_tiny
from keeplora_hf.models.tiny import matching_modules
from keeplora_hf.recipes import (
    PROJECTOR_MODULES,
    ModelArguments,
    keeplora_config,
    parse_recipe_args,
    projector_optimizer,
    refuse_unsupported_sharding,
    seed_principal_energy,
)
from keeplora_hf.recipes.loading import _quantization_config
from keeplora_hf.subspace import principal_basis, squared_singular_values
from recipe_helpers import CPU, REAL_CONFIGS, RECIPES, recipe_main

# the tiny architecture each checkpoint's module names are checked against (same transformers classes)
TINY_OF = {
    "llava-hf/llava-1.5-7b-hf": "llava",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2_vl",
    "LanguageBind/Video-LLaVA-7B-hf": "video_llava",
    "openai/clip-vit-base-patch16": "clip",
}


def test_yaml_values_are_defaults_and_flags_override(tmp_path):
    config = parse_recipe_args([str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--learning_rate", "5e-3",
                                "--keeplora.r", "8", "--keeplora.principal_energy=0.5", "--max_length", "64",
                                "--output_dir", str(tmp_path)])
    assert config.training.learning_rate == 5e-3 and config.data.max_length == 64
    assert config.keeplora["r"] == 8 and config.keeplora["principal_energy"] == 0.5
    assert config.training.per_device_train_batch_size == 4  # from the YAML
    assert config.model.model_name_or_path == "tiny:llava" and config.model.train_projector is True
    assert [t["name"] for t in config.tasks] == ["colour", "pair", "choice"]
    again = parse_recipe_args(["--config", str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--output_dir", str(tmp_path)])
    assert again.training.learning_rate == 1e-2


def test_unknown_yaml_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    config = yaml.safe_load((RECIPES / "llava_vqa" / "config_tiny.yaml").read_text())
    path.write_text(yaml.safe_dump({**config, "learning_rat": 1e-3}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: unknown keys \['learning_rat'\]"):
        parse_recipe_args([str(path)])
    with pytest.raises(ValueError, match=r"unknown KeepLoRAConfig fields \['rank'\]"):
        keeplora_config({"rank": 4, "target_modules": "x"})
    with pytest.raises(ValueError, match="target_modules is required"):
        keeplora_config({"r": 4})


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_configs_are_complete(path: Path):
    """Valid metrics and task entries, and targets / projector that exist in the architecture; the reference's values
    themselves are checked by test_recipe_fidelity.py."""
    config = parse_recipe_args([str(path), *CPU])
    assert config.data.data_root.startswith("/path/to/")  # the one thing to set
    assert config.model.torch_dtype in ("bfloat16", "float32") and not config.model.model_name_or_path.startswith("tiny:")
    peft_config, _ = keeplora_config(config.keeplora)
    tiny = build_tiny(TINY_OF[config.model.model_name_or_path]).model
    names = matching_modules(tiny, peft_config.target_modules)
    if path.parent.name == "clip_mtil":
        leaves = {"q_proj", "k_proj", "v_proj", "out_proj"}
        assert {n.split(".")[0] for n in names} == {"vision_model", "text_model"}
        for task in config.tasks:
            assert {"name", "train", "eval"} <= set(task) and "{}" in task.get("prompt", config.data.clip_prompt)
    else:
        assert yaml.safe_load(path.read_text())["bf16"] is True
        leaves = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert all(".language_model." in n for n in names)
        family = "qwen2_vl" if "Qwen" in config.model.model_name_or_path else "llava"
        projector = PROJECTOR_MODULES[family][0]
        assert any(n.endswith(projector) for n, _ in tiny.named_modules())
        for task in config.tasks:
            assert {"name", "train_file", "eval_file"} <= set(task) and task["metric"] in NORMALIZERS
    assert {n.rsplit(".", 1)[-1] for n in names} == leaves


def test_recipes_readme_names_every_accelerate_config():
    """(Each config's launch command in the README: test_recipe_fidelity.py, with the global batch it gives.)"""
    readme = (RECIPES / "README.md").read_text()
    for name in ("cpu", "single_gpu", "multi_gpu", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"):
        assert (RECIPES / "accelerate_configs" / f"{name}.yaml").is_file()
        assert f"accelerate_configs/{name}.yaml" in readme


def test_fsdp1_is_refused_before_anything_loads_zero_and_fsdp2_are_not(tmp_path, monkeypatch):
    config = parse_recipe_args([str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--output_dir", str(tmp_path / "run")])
    refuse_unsupported_sharding(config.training)  # plain: fine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("2", "3"):  # ZeRO-2 keeps whole weights on every rank; ZeRO-3 partitions are gathered layer by layer
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        refuse_unsupported_sharding(config.training)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    with pytest.raises(NotImplementedError, match="FSDP1 shards the weights as flat parameters.*fsdp2.yaml"):
        recipe_main("llava_vqa")([str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--output_dir", str(tmp_path / "run"),
                                  "--data_root", str(tmp_path / "data")])  # accelerate's default version is 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    monkeypatch.setenv("FSDP_VERSION", "2")
    refuse_unsupported_sharding(config.training)  # FSDP2: supported
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    config.training.fsdp, config.training.fsdp_config = "full_shard", {"version": 1}
    with pytest.raises(NotImplementedError, match="FSDP1"):
        refuse_unsupported_sharding(config.training)
    config.training.fsdp_config = {"version": 2}
    refuse_unsupported_sharding(config.training)


def test_quantized_loading_quantizes_the_targets_too_and_keeps_the_projector():
    pytest.importorskip("bitsandbytes")
    quantization = _quantization_config(ModelArguments(model_name_or_path="x", load_in_4bit=True), "llava")
    assert quantization.load_in_4bit and set(quantization.llm_int8_skip_modules) == {"multi_modal_projector", "lm_head"}
    args = ModelArguments(model_name_or_path="x", load_in_8bit=True, quantization_skip_modules=["q_proj"])
    assert set(_quantization_config(args, "llava").llm_int8_skip_modules) == {"q_proj", "multi_modal_projector", "lm_head"}
    with pytest.raises(ValueError, match="not both"):
        _quantization_config(ModelArguments(model_name_or_path="x", load_in_4bit=True, load_in_8bit=True), "llava")


def test_projector_gets_its_own_learning_rate(tmp_path):
    from keeplora_hf import KeepLoRATrainer

    config = parse_recipe_args([str(RECIPES / "llava_vqa" / "config_tiny.yaml"), "--output_dir", str(tmp_path)])
    peft_config, _ = keeplora_config(config.keeplora, PROJECTOR_MODULES["llava"])
    model = get_peft_model(build_tiny("llava").model, peft_config)
    kwargs = projector_optimizer(config.training, 1e-3)
    trainer = KeepLoRATrainer(model=model, args=config.training, **kwargs)
    optimizer = trainer.create_optimizer()
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], []).extend(group["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(by_lr) == {1e-2, 1e-3}
    assert all("modules_to_save" in names[id(p)] for p in by_lr[1e-3]) and len(by_lr[1e-3]) == 4  # 2 linears
    assert all("lora_B" in names[id(p)] for p in by_lr[1e-2])
    assert projector_optimizer(config.training, None) == {}


def test_principal_energy_pattern_seeds_the_text_tower():
    peft_config, pattern = keeplora_config({"r": 4, "lora_alpha": 1, "principal_energy": 0.85,
                                            "principal_energy_pattern": {r"text_model\.": 0.2},
                                            "target_modules": r".*encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"})
    original = build_tiny("clip").model
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if n.endswith(("q_proj", "v_proj"))}
    model = get_peft_model(original, peft_config)
    seeded = seed_principal_energy(model, pattern)
    assert seeded and all("text_model" in name for name in seeded)
    for name, module in model.base_model.model.named_modules():
        state = module.__dict__.get("keeplora_state", {}).get("default")
        if state is None:
            continue
        if "text_model" in name:
            assert state.principal.shape[1] == principal_basis(weights[name], 0.2).shape[1] < principal_basis(
                weights[name], 0.85).shape[1]
            # and their energies, which a state keeping only the complement of its protected subspace saves instead
            expected = squared_singular_values(weights[name])[: state.principal_rank]
            assert torch.allclose(state.principal_energies, expected, rtol=1e-6), name
        else:
            assert state.principal is None  # begin_task computes it with principal_energy
    with pytest.raises(ValueError, match="matches no KeepLoRA target"):
        seed_principal_energy(get_peft_model(build_tiny("clip").model, peft_config), {"nothing_here": 0.1})
