"""Bad input gets an error that names the problem (the file, the row, the field, the layer or the flag) and says what
to do, and nothing already saved or learned is lost."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tuner"))

from keeplora_setups import targets, wrap  # noqa: E402

from keeplora_hf import KeepLoRAConfig, begin_task  # noqa: E402
from keeplora_hf.cli import build_parser, main  # noqa: E402
from keeplora_hf.continual import ContinualTask  # noqa: E402
from keeplora_hf.continual.run_dir import RunInfo  # noqa: E402
from keeplora_hf.data import (  # noqa: E402
    ClipCollator,
    DataFormatError,
    VLMChatCollator,
    load_classification,
    load_llava_json,
)
from keeplora_hf.tuner.feature_memory import feature_covariances  # noqa: E402
from keeplora_hf.hub import load_run  # noqa: E402
from keeplora_hf.models import build_tiny_processor  # noqa: E402
from keeplora_hf.tuner.statistics import check_adapter_finite  # noqa: E402
from keeplora_hf.tuner.statistics_inputs import dataset_length  # noqa: E402
from keeplora_hf.tuner.adapter_files import check_adapter_files  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# -- 1. a damaged adapter folder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    """A tiny KeepLoRA adapter as `save_pretrained` writes it (r=4; tests copy it before changing it)."""
    model, _, _ = wrap("llava")
    folder = tmp_path_factory.mktemp("adapter") / "saved"
    model.save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    return folder


def _edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, **fields}))


def test_an_intact_adapter_folder_and_a_hub_id_pass(saved_adapter):
    check_adapter_files(saved_adapter, KeepLoRAConfig.from_pretrained(saved_adapter))
    check_adapter_files("someone/keeplora-adapter", KeepLoRAConfig(target_modules=["q_proj"]))  # left to PEFT


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_a_truncated_or_empty_weights_file_is_named_with_its_path(saved_adapter, tmp_path, keep):
    folder = _copy(saved_adapter, tmp_path)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: int(len(data) * keep)])
    before = (folder / WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match=rf"{folder / WEIGHTS} is truncated or corrupt.*save_pretrained"):
        check_adapter_files(folder, KeepLoRAConfig.from_pretrained(folder))
    assert (folder / WEIGHTS).read_bytes() == before  # the file is left for the user to restore


def test_a_missing_weights_file_is_named(saved_adapter, tmp_path):
    folder = _copy(saved_adapter, tmp_path)
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder / WEIGHTS} not found"):
        check_adapter_files(folder, KeepLoRAConfig.from_pretrained(folder))


def test_a_hand_edited_r_names_the_file_the_layer_the_field_and_both_ranks(saved_adapter, tmp_path):
    folder = _copy(saved_adapter, tmp_path)
    _edit_config(folder, r=8)
    with pytest.raises(ValueError) as error:
        check_adapter_files(folder, KeepLoRAConfig.from_pretrained(folder))
    message = str(error.value)
    assert str(folder / WEIGHTS) in message and str(folder / CONFIG) in message
    assert "layer model.language_model.layers.0." in message
    assert "saved with rank 4" in message and "`r` in" in message and "is 8" in message


def test_a_hand_edited_rank_pattern_names_its_entry(saved_adapter, tmp_path):
    folder = _copy(saved_adapter, tmp_path)
    _edit_config(folder, rank_pattern={"k_proj": 2})
    entry = r"`rank_pattern\['k_proj'\]` in .* is 2"
    with pytest.raises(ValueError, match=r"self_attn\.k_proj was saved with rank 4 .*" + entry):
        check_adapter_files(folder, KeepLoRAConfig.from_pretrained(folder))


def test_a_rank_pattern_saved_as_such_passes(tmp_path):
    model, _, _ = wrap("llava", rank_pattern={"k_proj": 2})
    model.save_pretrained(tmp_path)
    check_adapter_files(tmp_path, KeepLoRAConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "r_edited"])
def test_peft_model_from_pretrained_names_the_damaged_file(saved_adapter, tmp_path, damage):
    from peft import PeftModel

    from keeplora_hf.models import build_tiny

    folder = _copy(saved_adapter, tmp_path)
    if damage == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    else:
        _edit_config(folder, r=8)
    with pytest.raises(ValueError, match=re.escape(str(folder / WEIGHTS))):
        PeftModel.from_pretrained(build_tiny("llava").model, folder)


def test_end_task_blames_a_nan_lora_B_on_its_layer():
    from keeplora_hf import end_task

    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    name, module = list(targets(model).items())[3]
    module.lora_B["default"].weight.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"own weights of {name} are not finite"):
        end_task(model, batches)
    assert model.base_model.progress("default").in_task


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_finite_check_finds_every_nan_and_inf_and_no_more(dtype):
    """`all_finite` reads a sum first: a NaN/inf anywhere is caught, finite entries whose sum overflows are not blamed."""
    from keeplora_hf.tuner.statistics import all_finite

    base = torch.randn(64, 48, dtype=dtype)
    assert all_finite(base) and all_finite(base[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for row, column in ((0, 0), (63, 47), (17, 5)):
            broken = base.clone()
            broken[row, column] = bad
            assert not all_finite(broken), (bad, row, column)
    mixed = base.clone()
    mixed[0, 0], mixed[1, 1] = float("inf"), float("-inf")  # their sum is NaN: still caught
    assert not all_finite(mixed)
    huge = torch.full((8, 8), torch.finfo(dtype).max / 2, dtype=dtype)  # finite entries, an overflowing sum
    assert not torch.isfinite(huge.sum()) and all_finite(huge)


# -- 2. the adapter's own weights are not finite --------------------------------------------------------------------


@pytest.mark.parametrize("feature_source", ["activations", "mean_gradient"])
def test_a_nan_lora_B_is_blamed_on_its_layer_not_on_the_data(feature_source):
    model, batches, _ = wrap("llava", feature_source=feature_source)
    begin_task(model, batches)
    name, module = list(targets(model).items())[3]
    module.lora_B["default"].weight.data.fill_(float("nan"))
    with pytest.raises(ValueError, match=rf"own weights of {name} are not finite \(lora_B holds NaN/inf; 1 layer"):
        feature_covariances(model, batches)  # end_task's data pass
    assert model.base_model.progress("default").in_task  # the task is still under way, its weights as they were
    assert torch.isnan(module.lora_B["default"].weight).all()


def test_a_nan_lora_A_is_named_too():
    model, batches, _ = wrap("llava")
    begin_task(model, batches)
    layers = targets(model)
    name = list(layers)[-1]
    layers[name].lora_A["default"].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"{name} are not finite \(lora_A holds"):
        check_adapter_finite(layers, "default", "end_task")


# -- 3. data of unknown length -----------------------------------------------------------------------------------------


class _Stream(IterableDataset):
    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_an_iterable_dataset_with_a_ratio_below_one_says_to_pass_max_batches():
    model, batches, _ = wrap("llava", gradient_data_ratio=0.5)
    with pytest.raises(ValueError, match=r"has no len\(\).*gradient_data_ratio=0.5.*pass max_batches=N"):
        begin_task(model, DataLoader(_Stream(batches), batch_size=None))
    assert not model.base_model.progress("default").in_task
    begin_task(model, DataLoader(_Stream(batches), batch_size=None), max_batches=2)


def test_a_generator_is_used_whole_at_ratio_one_and_a_used_up_one_is_named():
    model, batches, _ = wrap("llava")  # gradient_data_ratio=1.0
    stream = (batch for batch in batches)
    begin_task(model, stream)
    assert model.base_model.progress("default").in_task
    with pytest.raises(ValueError, match="yielded no batches.*used up by one pass"):
        feature_covariances(model, stream)


def test_a_streamed_training_set_says_what_the_callback_needs_instead():
    with pytest.raises(TypeError, match=r"KeepLoRACallback .* \(_Stream\) has no len\(\).*streaming=True.*max_batches=N"):
        dataset_length(_Stream([]), "KeepLoRACallback")
    assert dataset_length([1, 2, 3], "KeepLoRACallback") == 3


# -- 4. what loss_fn returns ---------------------------------------------------------------------------------------------


def _per_token(model, batch):
    logits = model(**batch).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten().clamp(min=0), reduction="none"
    )


@pytest.mark.parametrize(
    ("loss_fn", "error", "message"),
    [
        (lambda model, batch: 1.0, TypeError, r"loss_fn returned a float \(1.0\).*scalar torch.Tensor"),
        (_per_token, ValueError,
         r"loss_fn returned a tensor of shape \(\d+,\) \(requires_grad=True\).*must return a scalar"),
        (lambda model, batch: model(**batch).loss.detach(), ValueError,
         r"loss_fn returned a tensor of shape \(\) with requires_grad=False.*not detached"),
    ],
    ids=["float", "per-token", "detached"],
)
def test_a_loss_fn_that_returns_no_scalar_with_a_graph_is_named(loss_fn, error, message):
    model, batches, _ = wrap("llava")
    with pytest.raises(error, match=message):
        begin_task(model, batches, loss_fn=loss_fn)
    assert not model.base_model.progress("default").in_task


# -- 5. task names -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("t" * 300, "300 bytes long in UTF-8, over the 200"),
        ("ocr\x00vqa", "NUL byte"),
        ("ocr/vqa", "path separator"),
    ],
    ids=["too-long", "nul", "separator"],
)
def test_task_names_that_cannot_name_a_directory_are_refused_when_the_task_is_made(name, rule):
    with pytest.raises(ValueError, match=rf"task name .* cannot name a directory: .*{rule}"):
        ContinualTask(name, [1], [1], lambda model, data: 0.0)


# -- 6. an image with too many pixels ---------------------------------------------------------------------------------


def _chat_row(image: str) -> dict:
    return {"id": "big", "image": image, "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                           {"from": "gpt", "value": "red"}]}


def test_an_image_over_the_pixel_limit_is_named_with_its_row_when_loaded(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "big.png")
    (tmp_path / "rows.json").write_text(json.dumps([_chat_row("big.png")]))
    (tmp_path / "classes.csv").write_text("image,label\nbig.png,red\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels is over twice the limit, as 13500^2 is by default
    too_large = r"image file .*big\.png.* has too many pixels to open .*MAX_IMAGE_PIXELS = 100"
    with pytest.raises(DataFormatError, match=r"rows\.json: row 0 \(id 'big'\): " + too_large):
        load_llava_json(tmp_path / "rows.json", tmp_path)
    with pytest.raises(DataFormatError, match=r"classes\.csv: row 0: " + too_large):
        load_classification(tmp_path / "classes.csv")


def test_an_image_over_the_pixel_limit_is_named_when_collated(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "big.png")
    (tmp_path / "rows.json").write_text(json.dumps([_chat_row("big.png")]))
    rows = load_llava_json(tmp_path / "rows.json", tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    collator = VLMChatCollator(build_tiny_processor("llava"), max_length=128, model_family="llava")
    with pytest.raises(ValueError, match=r"row 'big': .*big\.png.* has too many pixels"):
        collator([rows[0]])
    with pytest.raises(ValueError, match=r"image file .*big\.png.* has too many pixels.*downscale"):
        ClipCollator(build_tiny_processor("clip"))([{"image": str(tmp_path / "big.png"), "label": 0}])


# -- 7. numeric flags of the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag", "rule"),
    [
        (["demo", "--seeds", "0"], "--seeds", "at least 1"),
        (["demo", "--seeds", "-1"], "--seeds", "at least 1"),
        (["demo", "--orders", "0"], "--orders", "at least 1"),
        (["demo", "--data-seed", "-3"], "--data-seed", "at least 0"),
        (["pretrain", "--output-dir", "x", "--steps", "0"], "--steps", "at least 1"),
        (["pretrain", "--output-dir", "x", "--batch-size", "0"], "--batch-size", "at least 1"),
        (["analyze", "--output-dir", "x", "--eval-size", "0"], "--eval-size", "at least 1"),
        (["analyze", "--output-dir", "x", "--groups", "0"], "--groups", "at least 1"),
        (["analyze", "--output-dir", "x", "--energies", "0.5", "1.5"], "--energies", r"in \[0, 1\]"),
        (["analyze", "--output-dir", "x", "--finetune-lr", "0"], "--finetune-lr", "> 0"),
        (["analyze", "--output-dir", "x", "--finetune-batch-size", "0"], "--finetune-batch-size", "at least 1"),
        (["analyze", "--output-dir", "x", "--perturb-scale", "-1"], "--perturb-scale", "'auto' or a number > 0"),
        (["analyze", "--output-dir", "x", "--inter-energy", "2"], "--inter-energy", r"'auto' or a number in \[0, 1\]"),
        (["analyze", "--output-dir", "x", "--threads", "0"], "--threads", "at least 1"),
    ],
)
def test_numeric_flags_out_of_range_are_refused_naming_the_flag(argv, flag, rule, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert re.search(rf"argument {flag}: must be .*{rule}", capsys.readouterr().err)


def test_numeric_flags_in_range_and_auto_still_parse():
    args = build_parser().parse_args(["analyze", "--output-dir", "x", "--eval-size", "3", "--reset-energy", "0.5"])
    assert (args.eval_size, args.reset_energy, args.inter_energy, args.seed) == (3, 0.5, "auto", 0)


# -- 8. a local folder that does not exist ------------------------------------------------------------------------------


def test_a_missing_run_folder_is_not_called_a_malformed_repo_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"run folder not found: \./runs/llava-ucit"):
        main(["export", "./runs/llava-ucit", "out"])


@pytest.mark.parametrize("given", ["./models/llava-1.5", "~/no-such-models/llava-1.5", "checkpoints/llava/v1"])
def test_a_missing_base_model_folder_is_not_called_a_malformed_repo_id(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    info = RunInfo(root=tmp_path, source="run", config={"tasks": ["a"]}, rows={}, adapters={1: tmp_path}, learned=1,
                   adapter_config={})
    with pytest.raises(ValueError, match=rf"base model folder not found: {given}"):
        load_run(info, given)
