"""Each task's own training values in a recipe: learning rate and epochs per task, OneCycleLR, class-name folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from peft import get_peft_model

from keeplora_hf.continual import ContinualTask
from keeplora_hf.models import build_tiny
from keeplora_hf.recipes import (
    PROJECTOR_MODULES,
    OneCycleKeepLoRATrainer,
    TaskTrainers,
    keeplora_config,
    parse_recipe_args,
)
from keeplora_hf.trainer import KeepLoRATrainer
from recipe_helpers import RECIPES, check_results, recipe_main, tiny_args

TINY_VQA = RECIPES / "llava_vqa" / "config_tiny.yaml"


def _tasks(*names: str) -> list[ContinualTask]:
    return [ContinualTask(n, Dataset.from_dict({"x": [0]}), Dataset.from_dict({"x": [0]}), lambda m, d: 0.0)
            for n in names]


def _write(tmp_path: Path, source: Path, **changes) -> Path:
    config = yaml.safe_load(source.read_text())
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_task_trains_with_its_own_learning_rate_and_epochs_and_the_projector_keeps_its_own(tmp_path):
    config = parse_recipe_args([str(TINY_VQA), "--output_dir", str(tmp_path)])
    peft_config, _ = keeplora_config(config.keeplora, PROJECTOR_MODULES["llava"])
    model = get_peft_model(build_tiny("llava").model, peft_config)
    tasks = _tasks("first", "second")
    factory = TaskTrainers(tasks, {"first": {}, "second": {"learning_rate": 5e-3, "num_train_epochs": 3}},
                           projector_lr=1e-4)
    trainers = [factory(model=model, args=config.training, train_dataset=t.train_dataset) for t in tasks]
    assert [type(t) for t in trainers] == [KeepLoRATrainer, KeepLoRATrainer]
    assert (trainers[0].args.learning_rate, trainers[0].args.num_train_epochs) == (1e-2, config.training.num_train_epochs)
    assert (trainers[1].args.learning_rate, trainers[1].args.num_train_epochs) == (5e-3, 3)
    assert config.training.learning_rate == 1e-2  # the run's own arguments are left as they were
    for trainer, rate in zip(trainers, (1e-2, 5e-3)):
        assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {rate, 1e-4}
    with pytest.raises(ValueError, match=r"training values given for tasks \['third'\]"):
        TaskTrainers(tasks, {"third": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="no task of this sequence"):
        factory(model=model, args=config.training, train_dataset=Dataset.from_dict({"x": [0]}))


def test_one_cycle_is_torchs_schedule_over_the_task_peaking_at_each_groups_rate(tmp_path):
    config = parse_recipe_args([str(TINY_VQA), "--output_dir", str(tmp_path), "--lr_schedule", "one_cycle"])
    assert config.recipe.lr_schedule == "one_cycle"
    peft_config, _ = keeplora_config(config.keeplora, PROJECTOR_MODULES["llava"])
    model = get_peft_model(build_tiny("llava").model, peft_config)
    tasks = _tasks("only")
    trainer = TaskTrainers(tasks, {}, projector_lr=1e-4, one_cycle=True)(
        model=model, args=config.training, train_dataset=tasks[0].train_dataset)
    assert isinstance(trainer, OneCycleKeepLoRATrainer)
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(20, optimizer)
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    expected = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=1e-2, total_steps=20)
    for _ in range(20):
        rates = {round(g["lr"], 12) for g in optimizer.param_groups}
        assert rates == {round(expected.get_last_lr()[0], 12), round(expected.get_last_lr()[0] / 100, 12)}
        assert {g["betas"][0] for g in optimizer.param_groups} == {reference.param_groups[0]["betas"][0]}
        optimizer.step(), scheduler.step(), reference.step(), expected.step()
    assert max(expected.get_last_lr()) < 1e-2 / 25  # it ran the whole cycle: warm-up from lr/25, then down


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "1e-4", r"learning_rate must be a positive number, got '1e-4' \(YAML reads 1e-4 as text"),
    ("learning_rate", -1.0, "learning_rate must be a positive number, got -1.0"),
    ("num_train_epochs", 0, "num_train_epochs must be a positive number, got 0"),
    ("num_train_epochs", True, "num_train_epochs must be a positive number, got True"),
])
def test_a_bad_task_value_is_refused_with_file_task_and_field(tmp_path, key, value, message):
    config = yaml.safe_load(TINY_VQA.read_text())
    config["tasks"][1][key] = value
    path = _write(tmp_path, TINY_VQA, tasks=config["tasks"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: task 'pair': {message}"):
        parse_recipe_args([str(path), "--output_dir", str(tmp_path / "run")])


def test_an_unknown_schedule_in_the_yaml_is_refused(tmp_path):
    path = _write(tmp_path, TINY_VQA, lr_schedule="onecycle")
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \('trainer', 'one_cycle'\), got 'onecycle'"):
        parse_recipe_args([str(path), "--output_dir", str(tmp_path / "run")])


def test_class_names_dir_is_relative_to_the_yaml_file_and_to_the_working_directory_on_the_command_line(tmp_path):
    mtil = RECIPES / "clip_mtil" / "config_mtil_order1_vitb16.yaml"
    config = parse_recipe_args([str(mtil), "--fp16", "false", "--use_cpu", "true", "--output_dir", str(tmp_path)])
    assert config.data.class_names_dir == str(RECIPES / "clip_mtil" / "classnames")
    config = parse_recipe_args([str(mtil), "--fp16", "false", "--use_cpu", "true", "--output_dir", str(tmp_path),
                                "--class_names_dir", "names"])
    assert config.data.class_names_dir == "names"


def test_clip_tiny_with_task_values_one_cycle_and_class_names_from_a_folder(tmp_path, one_thread):
    """The tiny CLIP recipe end to end with each task's own epochs and rate, OneCycleLR, and a class-name file."""
    config = yaml.safe_load((RECIPES / "clip_mtil" / "config_tiny.yaml").read_text())
    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "secondary.txt").write_text("\n".join(config["tasks"][1]["class_names"]) + "\n")
    config["tasks"][0]["num_train_epochs"] = 1
    config["tasks"][1].update(class_names="secondary.txt", learning_rate=5.0e-4)
    path = _write(tmp_path, RECIPES / "clip_mtil" / "config_tiny.yaml", tasks=config["tasks"],
                  lr_schedule="one_cycle", class_names_dir="names")
    results = recipe_main("clip_mtil")([str(path), *tiny_args("clip_mtil", tmp_path)[1:]])
    check_results(tmp_path / "run", ["primary", "secondary"])
    assert results["config"]["recipe"]["lr_schedule"] == "one_cycle"
    assert results["config"]["recipe"]["tasks"][1]["learning_rate"] == 5e-4
