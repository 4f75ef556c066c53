"""The allow-list of `LoraConfig` fields (`keeplora_hf/tuner/lora_fields.py`): every field is verified with KeepLoRA++
here, or refused by name, and a field a later peft release adds is refused until it is verified."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel

from keeplora_hf import KeepLoRAConfig, begin_task, end_task, learned_update, protected_basis
from keeplora_hf.tuner.lora_fields import BOOKKEEPING_FIELDS, FIXED_FIELDS, VERIFIED_FIELDS

from keeplora_hf.models import build_tiny

from keeplora_setups import learn, outputs, targets, wrap

#: a non-default value of every LoraConfig field KeepLoRA refuses (a field missing here fails the census below)
REFUSED_SAMPLES = {
    "fan_in_fan_out": True,
    "use_rslora": True,
    "megatron_config": {"tensor_model_parallel_size": 1},
    "trainable_token_indices": [1, 2],
    "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0},
    "corda_config": {"corda_method": "kpm"},
    "lora_ga_config": {"direction": "ArB2r"},
    "use_dora": True,
    "velora_config": {"rank": 4},
    "alora_invocation_tokens": [5],
    "use_qalora": True,
    "monteclora_config": {"num_samples": 2},
    "layer_replication": [(0, 1)],
    "runtime_config": "ephemeral",
    "lora_bias": True,
    "target_parameters": ["weight"],
    "use_bdlora": {"target_modules_bd_a": ["q_proj"]},
    "arrow_config": {"top_k": 1},
    "kasa_config": {},
    "ensure_weight_tying": True,
}


def test_every_lora_config_field_is_verified_or_refused():
    allowed = BOOKKEEPING_FIELDS | VERIFIED_FIELDS | FIXED_FIELDS
    unclassified = [f.name for f in dataclasses.fields(LoraConfig) if f.name not in allowed | set(REFUSED_SAMPLES)]
    assert not unclassified, f"classify these LoraConfig fields (verify them with a test, or refuse them): {unclassified}"


@pytest.mark.parametrize("field", sorted(REFUSED_SAMPLES))
def test_a_refused_field_is_named(field):
    value = REFUSED_SAMPLES[field]
    if field == "runtime_config":
        from peft.tuners.lora.config import LoraRuntimeConfig

        value = LoraRuntimeConfig(ephemeral_gpu_offload=True)
    with pytest.raises(ValueError, match=rf"{field}.* not supported by KeepLoRA"):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], **{field: value})


def test_a_field_of_a_later_peft_release_is_refused_until_verified():
    @dataclasses.dataclass
    class NextRelease(KeepLoRAConfig):
        brand_new_variant: int = 0

    NextRelease(r=4, target_modules=["q_proj"])  # at its default it changes nothing
    with pytest.raises(ValueError, match="brand_new_variant.*not verified with KeepLoRA"):
        NextRelease(r=4, target_modules=["q_proj"], brand_new_variant=1)


@pytest.mark.parametrize(
    "patterns",
    [{"rank_pattern": {"q_proj": 0}}, {"alpha_pattern": {"q_proj": 0}}, {"alpha_pattern": {"q_proj": float("nan")}}],
    ids=["rank_0", "alpha_0", "alpha_nan"],
)
def test_a_degenerate_pattern_is_refused_like_r_and_lora_alpha(patterns):
    with pytest.raises(ValueError, match=r"(rank|alpha)_pattern\['q_proj'\]"):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], **patterns)


VERIFIED_SETTINGS = {
    "exclude_modules": {"exclude_modules": r".*vision_tower.*"},
    "lora_dropout": {"lora_dropout": 0.1},
    "layers_to_transform": {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    "rank_pattern": {"rank_pattern": {"q_proj": 2}},
    "alpha_pattern": {"alpha_pattern": {"v_proj": 2.0}},
    "modules_to_save": {"modules_to_save": ["multi_modal_projector"]},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("setting", sorted(VERIFIED_SETTINGS))
def test_a_verified_field_keeps_the_guarantee_and_round_trips(tmp_path, caplog, setting, dtype):
    model, batches, tiny = wrap("llava", dtype=dtype, **VERIFIED_SETTINGS[setting])
    with caplog.at_level(logging.WARNING, logger="keeplora_hf.tuner.lifecycle"):
        begin_task(model, batches)
    if setting == "modules_to_save":  # trained fully, outside any protection: said at every task
        assert "multi_modal_projector" in caplog.text
    bases = {name: protected_basis(model, name) for name in targets(model)}
    learn(model, batches)
    end_task(model, batches)
    for name, basis in bases.items():
        delta = learned_update(model, name)
        assert delta.norm() > 0, name
        assert (delta @ basis.to(delta)).norm() / delta.norm() <= 1e-4, name
    expected = outputs(model, batches[0])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build_tiny("llava").model.to(dtype), tmp_path)
    assert torch.equal(outputs(reloaded, batches[0]), expected)
