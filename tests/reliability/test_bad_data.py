"""Bad data files are refused with the file and row named, before training starts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from keeplora_hf.data.collators import VLMChatCollator
from keeplora_hf.data.formats import load_llava_json
from keeplora_hf.data.rows import DataFormatError
from keeplora_hf.models.demo import load_demo_model


def _row(image: str) -> dict:
    return {"id": "r0", "image": image, "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                          {"from": "gpt", "value": "red"}]}


def _png(path, size=32) -> None:
    Image.new("RGB", (size, size), "red").save(path)


def test_a_truncated_png_is_named_with_its_row_when_collated(tmp_path):
    _png(tmp_path / "a.png", size=256)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])  # the header still parses
    (tmp_path / "rows.json").write_text(json.dumps([_row("a.png")]))
    rows = load_llava_json(tmp_path / "rows.json", tmp_path)
    _, processor = load_demo_model(None)
    collator = VLMChatCollator(processor, max_length=128, model_family="llava")
    with pytest.raises(ValueError, match="row 'r0': an image cannot be decoded"):
        collator([rows[0]])


def test_a_utf16_file_is_refused_naming_the_file(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row("a.png")]), encoding="utf-16")
    with pytest.raises(DataFormatError, match=r"rows\.json: not UTF-8 text"):
        load_llava_json(path, tmp_path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    _png(tmp_path / "a.png")
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row("a.png")]), encoding="utf-8-sig")
    assert len(load_llava_json(path, tmp_path)) == 1


@pytest.mark.parametrize("where", ["../outside.png", "ABSOLUTE"])
def test_media_paths_that_leave_the_data_folder_are_refused(tmp_path, where):
    data = tmp_path / "data"
    data.mkdir()
    _png(tmp_path / "outside.png")
    image = str(tmp_path / "outside.png") if where == "ABSOLUTE" else where
    (data / "rows.json").write_text(json.dumps([_row(image)]))
    with pytest.raises(DataFormatError, match="leaves the data folder"):
        load_llava_json(data / "rows.json", data)


def test_a_truncated_adapter_file_is_named(tmp_path):
    from keeplora_hf.continual.run_dir import _state_task_index

    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match="adapter_model.safetensors .*incomplete or corrupt"):
        _state_task_index(tmp_path, "runs/x")
