"""Every compared method builds a trainable PEFT model with the same rank budget, and differs where it should."""

from __future__ import annotations

import pytest

import keeplora_hf  # noqa: F401
from keeplora_hf import KeepLoRAConfig, begin_task
from keeplora_hf.baselines import DEFAULT_METHODS, METHODS
from keeplora_hf.models import build_tiny
from peft import get_peft_model


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.make_config is not None])
def test_method_builds_and_trains(name):
    tiny = build_tiny("llava")
    config = METHODS[name].make_config(4, 8, tiny.language_targets, tiny.model)
    model = get_peft_model(tiny.model, config)
    batch = tiny.make_batch(2, 0)
    if isinstance(config, KeepLoRAConfig):
        begin_task(model, [batch])  # KEEPLORA adapters are inert until a task begins
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    model(**batch).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_methods_switch_off_what_they_lack():
    targets = "q_proj"
    config = lambda name: METHODS[name].make_config(4, 8, targets, None)  # noqa: E731
    seq, keep, keeppp, inf = config("seq-lora"), config("keeplora"), config("keeplora++"), config("inflora-style")
    assert isinstance(seq, KeepLoRAConfig) and seq.principal_energy == 0 and seq.feature_energy == 0
    assert seq.train_lora_A and seq.lora_A_init == "random" and seq.layer_scale_gamma == 1.0
    assert keep.layer_scale_gamma == 1.0 and keeppp.layer_scale_gamma == 0.2
    assert keep.principal_energy == keeppp.principal_energy == 0.6
    assert inf.principal_energy == 0.0 and inf.feature_energy == 0.99
    assert config("milora-style").lora_A_init == "minor_singular"
    assert set(DEFAULT_METHODS) == {"keeplora++", "seq-lora"}


def test_osf_keeps_exactly_r_trainable_directions():
    tiny = build_tiny("llava")
    model = get_peft_model(tiny.model, METHODS["osf"].make_config(4, 8, tiny.language_targets, tiny.model))
    lora = get_peft_model(build_tiny("llava").model, METHODS["seq-lora"].make_config(4, 8, tiny.language_targets, None))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    # OSF trains U_low (d_out x r), S_low (r) and V_low (r x d_in): LoRA's budget plus r per layer
    layers = sum(1 for n, _ in lora.named_modules() if n.endswith("lora_A"))
    assert count(model) == count(lora) + 4 * layers
