"""Every recipe's tiny config runs end to end and writes the runner's results.json / plots / report."""

from __future__ import annotations

import sys

import pytest
import yaml

from adapter_updates import task_updates
from recipe_helpers import ACCELERATE_CPU, RECIPES, check_results, recipe_main, run_command, tiny_args

VQA_TASKS = ["colour", "pair", "choice"]
VIDEO_TASKS = ["first", "last"]
CLIP_TASKS = ["primary", "secondary"]


@pytest.mark.slow
def test_vqa_tiny_with_accelerate_launch(tmp_path):
    """`accelerate launch` (one CPU process) of the LLaVA recipe: data written, checked, 3 tasks learned, scored."""
    run_command([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU), str(RECIPES / "llava_vqa" / "train.py"),
                 *tiny_args("llava_vqa", tmp_path)], cwd=tmp_path)
    results = check_results(tmp_path / "run", VQA_TASKS)
    recipe = results["config"]["recipe"]
    assert recipe["model"]["model_name_or_path"] == "tiny:llava" and recipe["keeplora"]["r"] == 4
    # the projector was trained as modules_to_save and saved with the adapter
    from safetensors import safe_open

    adapter = tmp_path / "run" / "tasks" / "003_choice" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        assert any("multi_modal_projector" in key for key in handle.keys())


@pytest.mark.slow
def test_vqa_tiny_on_two_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo): same results layout; the eval is sharded across ranks and all-reduced."""
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(RECIPES / "llava_vqa" / "train.py"),
                 *tiny_args("llava_vqa", tmp_path, "--ddp_backend", "gloo", "--per_device_train_batch_size", "2")],
                cwd=tmp_path, timeout=400)
    check_results(tmp_path / "run", VQA_TASKS)


@pytest.mark.slow
def test_vqa_tiny_with_accelerate_launch_and_deepspeed_zero3(tmp_path):
    """`accelerate launch` with the shipped ZeRO-3 config on 2 CPU processes (DeepSpeed's CPU accelerator, gloo): the
    recipe learns what 2 DDP processes learn, every task update within 1e-3 relative. Both clip at the `max_grad_norm`
    given (the config leaves DeepSpeed's clipping to it)."""
    config = yaml.safe_load((RECIPES / "accelerate_configs" / "deepspeed_zero3.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no")  # two CPU processes, float32 as the tiny config
    config_file = tmp_path / "zero3_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    zero3, ddp = tmp_path / "zero3", tmp_path / "ddp"
    zero3.mkdir(), ddp.mkdir()
    flags = ("--per_device_train_batch_size", "2", "--max_grad_norm", "1.0")
    run_command([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                 str(RECIPES / "llava_vqa" / "train.py"), *tiny_args("llava_vqa", zero3, *flags)], cwd=zero3, timeout=600)
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(RECIPES / "llava_vqa" / "train.py"),
                 *tiny_args("llava_vqa", ddp, "--ddp_backend", "gloo", *flags)], cwd=ddp, timeout=400)
    check_results(zero3 / "run", VQA_TASKS)
    sharded, replicated = task_updates(zero3 / "run"), task_updates(ddp / "run")
    assert sharded.keys() == replicated.keys() and sharded
    assert max(float((sharded[k] - replicated[k]).norm() / replicated[k].norm()) for k in sharded) <= 1e-3


def test_video_tiny(tmp_path, one_thread):
    """Video-LLaVA on clips of 2 to 5 frames, question/answer and conversation rows."""
    pytest.importorskip("av")
    recipe_main("video_llm")(tiny_args("video_llm", tmp_path))
    check_results(tmp_path / "run", VIDEO_TASKS)


def test_video_tiny_qwen2_vl(tmp_path, one_thread):
    """The same recipe on Qwen2-VL's video input: another collator family, its visual merger as the projector."""
    pytest.importorskip("av")
    recipe_main("video_llm")(tiny_args("video_llm", tmp_path, "--model_name_or_path", "tiny:qwen2_vl"))
    check_results(tmp_path / "run", VIDEO_TASKS)


def test_clip_tiny(tmp_path, one_thread, capsys):
    """CLIP: zero-shot heads from class prompts, folder and CSV tasks, Transfer / Avg / Last printed."""
    results = recipe_main("clip_mtil")(tiny_args("clip_mtil", tmp_path))
    check_results(tmp_path / "run", CLIP_TASKS)
    assert "MTIL  Transfer" in capsys.readouterr().out
    metrics = results["methods"]["keeplora++"]["metrics"]
    assert all(metrics[k] is not None for k in ("transfer", "avg", "last"))
    # the text tower kept its own epsilon_w (principal_energy_pattern), saved with the adapter
    from safetensors.torch import load_file

    from keeplora_hf.models import build_tiny
    from keeplora_hf.subspace import principal_basis

    state = load_file(str(tmp_path / "run" / "tasks" / "002_secondary" / "adapter" / "adapter_model.safetensors"))
    original = dict(build_tiny("clip").model.named_modules())
    for layer in ("text_model.encoder.layers.0.self_attn.q_proj", "vision_model.encoder.layers.0.self_attn.q_proj"):
        key = next(k for k in state if k.endswith(f"{layer}.keeplora_state.principal"))
        energy = 0.2 if layer.startswith("text") else 0.85
        p = state[key].numel() if state[key].ndim == 1 else state[key].shape[1]  # energies, or the basis
        assert p == principal_basis(original[layer].weight, energy).shape[1]
    # the same command again finds the finished run and only reports it
    again = recipe_main("clip_mtil")(tiny_args("clip_mtil", tmp_path))
    assert again["methods"]["keeplora++"]["accuracy_matrix"] == results["methods"]["keeplora++"]["accuracy_matrix"]


def test_help_lists_every_argument(capsys):
    """`train.py --help` documents the model, data, recipe and TrainingArguments flags."""
    with pytest.raises(SystemExit) as exit_:
        recipe_main("clip_mtil")(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--data_root", "--projector_learning_rate", "--load_in_4bit", "--overwrite_run",
                 "--activation_checkpointing", "--bf16"):
        assert flag in shown


def test_trl_sft_tiny(tmp_path, one_thread):
    """TRL's SFTTrainer on conversational messages + images, through ContinualRunner(trainer_class=SFTTrainer)."""
    pytest.importorskip("trl")
    recipe_main("trl_sft")(tiny_args("trl_sft", tmp_path))
    results = check_results(tmp_path / "run", ["frame_colour", "count_red"])
    assert results["config"]["recipe"]["model_name_or_path"] == "demo"
