import pytest

import keeplora_hf  # noqa: F401  registers the peft type
from keeplora_hf import KEEPLORA_PEFT_TYPE, KeepLoRAConfig
from peft import PeftConfig


def test_defaults_and_peft_type():
    config = KeepLoRAConfig(r=8, target_modules=["q_proj"])
    assert config.peft_type == KEEPLORA_PEFT_TYPE == "KEEPLORA"
    assert (config.principal_energy, config.feature_energy, config.layer_scale_gamma) == (0.6, 0.99, 0.2)
    assert (config.gradient_data_ratio, config.train_lora_A, config.feature_source) == (0.2, False, "activations")
    assert config.keep_principal_basis is False  # the state stays within min(k, d_in - k) * d_in values per layer
    assert (config.principal_side, config.activation_statistic) == ("right", "second_moment")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("principal_energy", 1.5, r"principal_energy must be in \[0, 1\]"),
        ("principal_energy", -0.1, r"principal_energy must be in \[0, 1\]"),
        ("feature_energy", 2.0, r"feature_energy must be in \[0, 1\]"),
        ("layer_scale_gamma", 0.0, r"layer_scale_gamma must be in \(0, 1\]"),
        ("layer_scale_gamma", 1.2, r"layer_scale_gamma must be in \(0, 1\]"),
        ("gradient_data_ratio", 0.0, r"gradient_data_ratio must be in \(0, 1\]"),
        ("feature_source", "weights", "feature_source must be one of"),
        ("principal_side", "output", r"principal_side must be one of \('right', 'left'\)"),
        ("activation_statistic", "mean", r"activation_statistic must be one of \('second_moment', 'position_mean'\)"),
        ("train_lora_A", "yes", "train_lora_A must be a bool"),
        ("use_dora", True, "use_dora is not supported by KeepLoRA"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], **{field: value})


def test_position_mean_is_refused_for_a_gradient_feature_source():
    with pytest.raises(ValueError, match="activation_statistic='position_mean' is a statistic of the input activations"):
        KeepLoRAConfig(r=4, target_modules=["q_proj"], feature_source="mean_gradient", activation_statistic="position_mean")


def test_round_trip_through_peft_config(tmp_path):
    config = KeepLoRAConfig(
        r=4, target_modules=["q_proj"], principal_energy=0.85, layer_scale_gamma=1.0, principal_side="left",
        activation_statistic="position_mean",
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, KeepLoRAConfig)
    assert loaded.principal_energy == 0.85 and loaded.layer_scale_gamma == 1.0
    assert (loaded.principal_side, loaded.activation_statistic) == ("left", "position_mean")
