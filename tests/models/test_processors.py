"""Offline processors: the tiny models accept what they produce, and they survive save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from keeplora_hf.models import TINY_MODELS, build_tiny
from keeplora_hf.models.processors import (
    CHAT_TEMPLATE,
    TINY_VOCABULARY,
    build_tiny_processor,
    build_tiny_tokenizer,
)
from keeplora_hf.models.tiny import (
    BOS_ID,
    EOS_ID,
    FIRST_SPECIAL_ID,
    FIRST_TEXT_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
)

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
CLIP_FRAMES = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


def _inputs(name: str, processor) -> dict:
    """One image prompt per model (a clip for the video models), as `processor(...)` returns it."""
    if name == "clip":
        return processor(text=["a photo of a red circle.", "a blue star"], images=[IMAGE, IMAGE], padding=True)
    if name in ("llava_next_video", "video_llava"):
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
        return processor(text=[text], videos=[CLIP_FRAMES])
    content = [{"type": "image"}, {"type": "text", "text": "?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}])
    return processor(text=[text], images=[IMAGE])


def test_vocabulary_fits_the_tiny_models_text_ids() -> None:
    tokenizer = build_tiny_tokenizer("llava")
    assert FIRST_TEXT_ID + len(TINY_VOCABULARY) <= FIRST_SPECIAL_ID
    assert len(tokenizer) == VOCAB_SIZE
    assert len(set(TINY_VOCABULARY)) == len(TINY_VOCABULARY)
    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_TOKEN_ID,
                "<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID}  # fmt: skip
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in specials} == specials
    words = [w for w in TINY_VOCABULARY if w != "<unk>"]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert ids == list(range(FIRST_TEXT_ID + 1, FIRST_TEXT_ID + len(TINY_VOCABULARY))), "one id per word"
    assert tokenizer("What COLOUR is it?<image>12")["input_ids"] == [BOS_ID] + tokenizer.convert_tokens_to_ids(
        ["what", "colour", "is", "it", "?", "<image>", "1", "2"]
    )
    assert tokenizer.decode(tokenizer("Red circle, top left.")["input_ids"], skip_special_tokens=True) == (
        "red circle , top left ."
    )


def test_chat_template_is_llava_style() -> None:
    processor = build_tiny_processor("llava")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And?"},
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == "USER: <image>\nWhat colour? ASSISTANT: red</s>USER: And? ASSISTANT:"
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE
    qwen = build_tiny_processor("qwen2_vl").apply_chat_template(conversation[:1])
    assert qwen == "USER: <|vision_start|><image><|vision_end|>\nWhat colour? "


@pytest.mark.parametrize("name", TINY_MODELS)
def test_processor_output_runs_the_tiny_model(name: str) -> None:
    processor = build_tiny_processor(name)
    batch = dict(_inputs(name, processor).convert_to_tensors("pt"))
    model = build_tiny(name).model
    if name == "clip":
        assert torch.all(batch["input_ids"][:, 0] == BOS_ID)
        output = model(**batch, return_loss=True)
    else:
        output = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_save_and_load_round_trip(name: str, tmp_path: Path) -> None:
    processor = build_tiny_processor(name)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor)
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id) == (
        processor.tokenizer.pad_token_id,
        processor.tokenizer.eos_token_id,
    )
    before, after = _inputs(name, processor), _inputs(name, loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(np.asarray(before[key]), np.asarray(after[key])), key


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_processor("gpt")
