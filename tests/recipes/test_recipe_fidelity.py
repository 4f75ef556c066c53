"""Every shipped real-checkpoint recipe holds the reference's values (docs/method.md, "Fidelity to the reference code").

The expected values are written here from the reference code, public repository MaolinLuo/KeepLoRA: branch v2
(KeepLoRA++; commits 7abf7ec, 536498e, f12b4dd) where its files are readable, else branch v1 (KeepLoRA; commit
a17f9c2). Each value names its file, so a config that drifts from it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from keeplora_hf.recipes import keeplora_config, parse_recipe_args
from recipe_helpers import CPU, REAL_CONFIGS, RECIPES

LLM_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|"
               r"mlp\.(gate_proj|up_proj|down_proj))")
CLIP_TARGETS = r"(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
UCIT = ["ImageNet-R", "ArxivQA", "VizWiz", "IconQA", "CLEVR-Math", "Flickr30k"]
MTIL_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
          "StanfordCars", "SUN397"]
MTIL_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
           "EuroSAT", "CIFAR100"]

# v1 MCITlib/KeepLoRA/configs/model_configs/LLaVA/UCIT/train/task{1..6}.json: gpu_num 4, batch_size 8, grad_acc 2,
# epoch 1, rank 32, lr 2e-4 (task6: 1e-4); scripts/Train_UCIT/Task*.sh: lora_alpha RANK/4, mm_projector_lr 2e-5,
# cosine, warmup_ratio 0.03, weight_decay 0, DeepSpeed with scripts/zero2.json, which sets no gradient_clipping (so
# nothing clips: the Trainer leaves clipping to DeepSpeed); train_all.sh: extract_weights 0.6, gradient data 0.2;
# train_post/task*.json: energy_threshold 0.99. v2 DCL_UCIT/KeepLoRA/llava/train/train.py: the layer-wise alpha
# base * (0.2 + 0.8 i / (L - 1)). The seed is the Trainer's default (42): the scripts pass none.
# v1 MCITlib/KeepLoRA/llava/train/extract_weights.py: the right singular vectors of W (svd of W^T, U[:, :p]);
# extract_gradients.py: the memory from the task's mean weight gradient (its input side)
UCIT_SETTINGS = dict(
    global_batch=64, r=32, alpha=8, gamma=0.2, eps_w=0.6, eps_f=0.99, ratio=0.2, projector_lr=2e-5,
    targets=LLM_TARGETS, schedule="cosine", weight_decay=0.0, seed=42, statistics=("mean_gradient", "right"),
    max_grad_norm=0.0,
)
EXPECTED = {
    "llava_vqa/config_ucit_llava15_7b.yaml": dict(
        UCIT_SETTINGS, order=UCIT, lr=[2e-4] * 5 + [1e-4], epochs=[1] * 6,
    ),
    # the reference has no Qwen2-VL and no CoIN run: UCIT's LLaVA-1.5 settings, as the configs say
    "llava_vqa/config_ucit_qwen2vl_7b.yaml": dict(
        UCIT_SETTINGS, order=UCIT, lr=[2e-4] * 5 + [1e-4], epochs=[1] * 6,
    ),
    "llava_vqa/config_coin_llava15_7b.yaml": dict(
        UCIT_SETTINGS, order=["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCR-VQA"],
        lr=[2e-4] * 8, epochs=[1] * 8,
    ),
    # v1 MCITlib/KeepLoRA/configs/model_configs/LLaVA/MLLM-DCL/train/task{1..5}.json: gpu_num 4, batch_size 8,
    # grad_acc 2, rank 64, lr 2e-5, epochs 1, 3, 1, 2, 1; scripts/Train_DCL/Task*.sh: lora_alpha RANK * 2,
    # mm_projector_lr 2e-5; train_all.sh: order RS, Med, AD, Sci, Fin, ratio 0.2, extract_weights 0.6
    "llava_vqa/config_dcl_llava15_7b.yaml": dict(
        UCIT_SETTINGS, order=["RS", "Med", "AD", "Sci", "Fin"], r=64, alpha=128, lr=[2e-5] * 5,
        epochs=[1, 3, 1, 2, 1],
    ),
    # v2 CL_VISTA/configs/train_configs/KeepLoRA/Video-LLaVA/CL-VISTA/train/task{1..8}.json: gpu_num 2,
    # batch_size 4, grad_acc 2, rank 64, epoch 1, lr 1e-4; KeepLoRA/scripts/MCITlib/Train/Task1.sh, Taskn.sh:
    # lora_alpha RANK * 2 (one scalar: no layer scaling; gamma 0.2 here is the paper's, see docs/method.md),
    # mm_projector_lr 1e-5; train_CVU.sh: extract_weights 0.6, gradient data 0.1; train_post/task*.json: 0.99;
    # videollava/train/train.py: DataArguments.num_frames 8 for training
    "video_llm/config_clvista_video_llava_7b.yaml": dict(
        UCIT_SETTINGS, order=["Counting", "Space", "Traffic", "Movie", "GUI", "Science", "Sports", "STAR"],
        global_batch=16, r=64, alpha=128, ratio=0.1, projector_lr=1e-5, lr=[1e-4] * 8, epochs=[1] * 8, frames=8,
    ),
}
# v2 MTIL/configs/keeplora_cls_order{1,2}.yaml (536498e; the KeepLoRA++ keeplora_order*.yaml of v2 is not readable,
# v1's is used for the epochs): batch_size 64, AdamW lr 1e-3, weight_decay 0.01, OneCycleLR, prec amp, seed 42,
# q,k,v,o of both encoders, adapter_dim 16, thresholds 0.85 vision / 0.2 text, 0.99 memory; v2
# MTIL/model/peft_vit.py (7abf7ec): lora_alpha 1, layer scales gamma 0.2; v2 MTIL/trainer/trainer.py: no gradient
# clipping, the gradient estimate over the whole task set; v2 MTIL/model/peft_modules.py: the memory from the
# position-aligned running mean of the inputs; v1 MTIL/model/prin_subspace.py with prin_subspace_helper.py: U[:, :p]
# of svd(W) as the principal basis; v1 MTIL/configs/keeplora_order{1,2}.yaml: epoch_list
MTIL_SETTINGS = dict(
    global_batch=64, r=16, alpha=1, gamma=0.2, eps_w=0.85, eps_f=0.99, ratio=1.0, projector_lr=None,
    targets=CLIP_TARGETS, weight_decay=0.01, seed=42, lr_schedule="one_cycle", lr=[1e-3] * 11,
    statistics=("activations", "left", "position_mean"), max_grad_norm=0.0,
)
EXPECTED |= {
    "clip_mtil/config_mtil_order1_vitb16.yaml": dict(MTIL_SETTINGS, order=MTIL_I, epochs=[10] * 10 + [5]),
    "clip_mtil/config_mtil_order2_vitb16.yaml": dict(
        MTIL_SETTINGS, order=MTIL_II, epochs=[5, 2, 5, 5, 5, 5, 10, 10, 10, 10, 10],
    ),
}
# v1 MTIL/MTIL_datasets/collections.py (ZSCL's), templates[0] of each dataset, as main.py passes them
MTIL_PROMPTS = {
    "Aircraft": "a photo of a {}, a type of aircraft.",
    "Caltech101": "a photo of a {}.",
    "CIFAR100": "a photo of a {}.",
    "DTD": "a photo of a {} thing.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Flowers": "a photo of a {}, a type of flower.",
    "Food": "a photo of a {}, a type of food.",
    "MNIST": 'a photo of the number: "{}".',
    "OxfordPet": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of the {}, a type of car.",
    "SUN397": "a photo of the {}.",
}
# the same file's class lists (Caltech101, EuroSAT, Flowers) and torchvision's classes for the others: count, first
# and last name in label order, and one name that shows the reference's spelling
MTIL_CLASSES = {
    "Aircraft": (100, "707-320", "Yak-42", "F/A-18"),
    "Caltech101": (101, "off-center face", "yin and yang symbol", "centered face"),
    "CIFAR100": (100, "apple", "worm", "aquarium fish"),
    "DTD": (47, "banded", "zigzagged", "polka-dotted"),
    "EuroSAT": (10, "annual crop land", "lake or sea", "brushland or shrubland"),
    "Flowers": (102, "pink primrose", "blackberry lily", "hard-leaved pocket orchid"),
    "Food": (101, "apple pie", "waffles", "cheese plate"),
    "MNIST": (10, "0 - zero", "9 - nine", "5 - five"),
    "OxfordPet": (37, "Abyssinian", "Yorkshire Terrier", "American Pit Bull Terrier"),
    "StanfordCars": (196, "AM General Hummer SUV 2000", "smart fortwo Convertible 2012",
                     "Ram C/V Cargo Van Minivan 2012"),
    "SUN397": (397, "abbey", "youth hostel", "apartment building/outdoor"),
}
LAUNCH = re.compile(r"accelerate launch --config_file (\S+)((?: --\w+ \S+)*) \\\n#\s+(recipes/\S+/train\.py \S+\.yaml)")


def _config(path: Path):
    return parse_recipe_args([str(path), *CPU])


def _key(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def launch_command(path: Path) -> tuple[str, int]:
    """The launch command a config documents, and the processes it runs (its accelerate config's, or the override)."""
    found = LAUNCH.search(path.read_text())
    assert found, f"{_key(path)} documents no `accelerate launch --config_file ...` command"
    accelerate, flags, script = found.groups()
    processes = yaml.safe_load((RECIPES.parent / accelerate).read_text())["num_processes"]
    override = re.search(r"--num_processes (\d+)", flags)
    command = f"accelerate launch --config_file {accelerate}{flags} \\"
    return command + f"\n    {script}", int(override.group(1)) if override else processes


def test_every_shipped_config_is_checked_here():
    assert sorted(_key(p) for p in REAL_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=_key)
def test_batch_geometry_gives_the_reference_global_batch(path: Path):
    """per-device x accumulation x processes (the launch command's accelerate config or its --num_processes)."""
    config = _config(path)
    command, processes = launch_command(path)
    training = config.training
    assert (training.per_device_train_batch_size * training.gradient_accumulation_steps * processes
            == EXPECTED[_key(path)]["global_batch"])
    readme = (RECIPES / "README.md").read_text()
    assert command in readme, f"recipes/README.md lacks the launch command of {_key(path)}:\n{command}"


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=_key)
def test_task_order_learning_rates_and_epochs(path: Path):
    expected = EXPECTED[_key(path)]
    config = _config(path)
    assert [t["name"] for t in config.tasks] == expected["order"]
    rates = [t.get("learning_rate", config.training.learning_rate) for t in config.tasks]
    epochs = [t.get("num_train_epochs", config.training.num_train_epochs) for t in config.tasks]
    assert rates == expected["lr"] and epochs == expected["epochs"]
    assert config.training.weight_decay == expected["weight_decay"] and config.training.seed == expected["seed"]
    assert config.training.max_grad_norm == expected["max_grad_norm"]
    assert config.recipe.lr_schedule == expected.get("lr_schedule", "trainer")
    if config.recipe.lr_schedule == "trainer":
        assert config.training.lr_scheduler_type == expected["schedule"] and config.training.warmup_steps == 0.03
    assert config.model.projector_learning_rate == expected["projector_lr"]
    assert config.model.train_projector is (expected["projector_lr"] is not None)


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=_key)
def test_keeplora_settings(path: Path):
    expected = EXPECTED[_key(path)]
    config = _config(path)
    peft_config, pattern = keeplora_config(config.keeplora)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.layer_scale_gamma) == (
        expected["r"], expected["alpha"], expected["gamma"])
    assert (peft_config.principal_energy, peft_config.feature_energy, peft_config.gradient_data_ratio) == (
        expected["eps_w"], expected["eps_f"], expected["ratio"])
    assert config.keeplora["target_modules"] == expected["targets"]
    source, side, *statistic = expected["statistics"]
    assert (peft_config.feature_source, peft_config.principal_side) == (source, side)
    assert [peft_config.activation_statistic] == statistic or not statistic
    if path.parent.name == "clip_mtil":
        assert pattern == {r"text_model\.": 0.2}
    else:
        assert pattern == {} and config.keeplora["lora_dropout"] == 0.05  # the reference's default dropout
    if "frames" in expected:
        assert config.data.num_frames == expected["frames"]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("clip_mtil/config_mtil_*.yaml")), ids=_key)
def test_mtil_prompts_class_names_and_precision(path: Path):
    config = _config(path)
    raw = yaml.safe_load(path.read_text())
    assert raw["fp16"] is True  # prec: amp
    assert Path(config.data.class_names_dir) == RECIPES / "clip_mtil" / "classnames"
    for task in config.tasks:
        assert task["prompt"] == MTIL_PROMPTS[task["name"]], task["name"]
        names = (Path(config.data.class_names_dir) / task["class_names"]).read_text(encoding="utf-8").splitlines()
        count, first, last, spelled = MTIL_CLASSES[task["name"]]
        assert (len(names), names[0], names[-1]) == (count, first, last), task["name"]
        assert spelled in names and len(set(names)) == count and all(n == n.strip() and n for n in names)
