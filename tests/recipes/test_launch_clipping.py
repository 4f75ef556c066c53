"""Every shipped recipe config launches unedited with every shipped DeepSpeed accelerate config: the Trainer refuses a
`gradient_clipping` fixed in the accelerate config that disagrees with the recipe's `max_grad_norm` (the reference's
configs set 0: no clipping). Only DeepSpeed's section of an accelerate config can set clipping; under the others the
Trainer's `max_grad_norm` alone decides."""

from __future__ import annotations

import types

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env

from keeplora_hf.recipes import parse_recipe_args
from recipe_helpers import CPU, RECIPES

DEEPSPEED_CONFIGS = [path for path in sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
                     if yaml.safe_load(path.read_text())["distributed_type"] == "DEEPSPEED"]
RECIPE_CONFIGS = sorted(RECIPES.glob("*/config_*.yaml"))


def launched_plugin(accelerate_config, monkeypatch) -> DeepSpeedPlugin:
    """The DeepSpeed plugin a process started by `accelerate launch --config_file <accelerate_config>` builds, from the
    environment accelerate's own launcher code makes of that file."""
    args = launch_command_parser().parse_args(["--config_file", str(accelerate_config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


def training_arguments(recipe):
    """The TrainingArguments the recipe's train.py builds from it (TRL's SFTConfig from the `sft` section for trl_sft)."""
    if recipe.parent.name == "trl_sft":
        trl = pytest.importorskip("trl")
        return trl.SFTConfig(**yaml.safe_load(recipe.read_text())["sft"])
    return parse_recipe_args([str(recipe), *CPU]).training


def test_both_zero_configs_are_checked():
    assert [path.stem for path in DEEPSPEED_CONFIGS] == ["deepspeed_zero2", "deepspeed_zero3"]


@pytest.mark.parametrize("recipe", RECIPE_CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
@pytest.mark.parametrize("accelerate_config", DEEPSPEED_CONFIGS, ids=lambda path: path.stem)
def test_deepspeed_clips_at_the_recipes_max_grad_norm(accelerate_config, recipe, monkeypatch):
    """What the Trainer does with the launched plugin (`propagate_args_to_deepspeed`): fill DeepSpeed's "auto" values
    from the TrainingArguments and list the fixed ones that disagree, which it then raises on."""
    pytest.importorskip("deepspeed")  # transformers' DeepSpeed config checks it is installed
    from transformers.integrations.deepspeed import propagate_args_to_deepspeed, unset_hf_deepspeed_config

    training = training_arguments(recipe)
    plugin = launched_plugin(accelerate_config, monkeypatch)
    try:
        propagate_args_to_deepspeed(types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin)), training)
        assert plugin.hf_ds_config.mismatches == []
        assert plugin.deepspeed_config["gradient_clipping"] == training.max_grad_norm
    finally:
        unset_hf_deepspeed_config()  # the config registered itself as this process's DeepSpeed config
