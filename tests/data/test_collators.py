"""Collators feed the tiny models real batches: answers-only labels, padding, truncation, generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.processing_utils import ProcessorMixin

from keeplora_hf.data import (
    IGNORE_INDEX,
    ClipCollator,
    DataFormatError,
    VLMChatCollator,
    clip_classification_loss,
    load_classification,
    load_llava_json,
    validate_lengths,
)
from keeplora_hf.models import build_tiny
from keeplora_hf.models.processors import build_tiny_processor
from keeplora_hf.models.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

CHAT_FAMILIES = ("llava", "llava_next_video", "video_llava", "qwen2_vl")
VIDEO_FAMILIES = CHAT_FAMILIES[1:]
IMAGE_TOKENS = {"llava": 16, "llava_next_video": 36, "video_llava": 16, "qwen2_vl": 4}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("a", "b"):
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[name])
    paths["wide"] = str(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (20, 32, 3), dtype=np.uint8)).save(paths["wide"])
    return paths


@pytest.fixture(scope="module")
def clip_frames() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


def _chat(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _ids(processor: ProcessorMixin, *tokens: str) -> list[int]:
    return processor.tokenizer.convert_tokens_to_ids(list(tokens))


def test_labels_supervise_exactly_the_answers(media: dict[str, str]) -> None:
    """Hand-built two-turn row: every token checked, loss only on each answer and its EOS."""
    processor = build_tiny_processor("llava")
    row = {"id": "r", "images": [media["a"]], "messages": _chat("<image>\nWhat colour?", "red", "Shape?", "a circle")}
    batch = VLMChatCollator(processor, 128, "llava")([row])
    segments = [  # (token ids, supervised)
        (_ids(processor, "<s>", "user", ":") + [IMAGE_TOKEN_ID] * 16, False),
        (_ids(processor, "what", "colour", "?", "assistant", ":"), False),
        (_ids(processor, "red", "</s>"), True),
        (_ids(processor, "user", ":", "shape", "?", "assistant", ":"), False),
        (_ids(processor, "a", "circle", "</s>"), True),
    ]
    expected_ids = [t for ids, _ in segments for t in ids]
    expected_labels = [t if supervised else IGNORE_INDEX for ids, supervised in segments for t in ids]
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    assert batch["attention_mask"][0].tolist() == [1] * len(expected_ids)


def _rows(family: str, media: dict[str, str], frames: np.ndarray) -> list[dict]:
    rows = [
        {"id": "two-images", "images": [media["a"], media["b"]], "messages": _chat("<image> or <image>?", "left")},
        {"id": "text", "images": [], "messages": _chat("How many?", "3", "Is it?", "yes")},
    ]
    if family in VIDEO_FAMILIES:
        rows.append({"id": "clip", "videos": [frames], "messages": _chat("<video>\nWhere?", "up")})
    return rows


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_batches_run_through_the_tiny_model(family: str, media: dict[str, str], clip_frames: np.ndarray) -> None:
    """Several images in a row, a text-only row and a clip in one batch; right padding is masked out."""
    processor = build_tiny_processor(family)
    rows = _rows(family, media, clip_frames)
    batch = VLMChatCollator(processor, 128, family, num_frames=2)(rows)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids[0] == IMAGE_TOKEN_ID).sum() == 2 * IMAGE_TOKENS[family]
    assert (ids == VIDEO_TOKEN_ID).any() == (family in VIDEO_FAMILIES)
    assert torch.all(labels[mask == 0] == IGNORE_INDEX) and torch.all(ids[mask == 0] == 0)
    assert torch.all(mask[:, :1] == 1), "training batches are right-padded"
    assert not torch.isin(labels, torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])).any()
    decoded = [processor.tokenizer.decode(ids[r][labels[r] != IGNORE_INDEX]) for r in range(len(rows))]
    assert decoded[:2] == ["left </s>", "3 </s> yes </s>"]
    loss = build_tiny(family).model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ("llava", "qwen2_vl"))
def test_generation_batches_are_left_padded_prompts(family: str, media: dict[str, str]) -> None:
    """The final answer is dropped, prompts end with the generation prompt, and left padding changes nothing."""
    processor = build_tiny_processor(family)
    model = build_tiny(family).model.eval()
    collator = VLMChatCollator(processor, 128, family, for_generation=True)
    rows = _rows(family, media, np.zeros(0))[:2]
    batch = collator(rows)
    assert "labels" not in batch
    mask = batch["attention_mask"]
    assert torch.all(mask[:, -1] == 1) and (mask[:, 0] == 0).any(), "left-padded"
    tail = _ids(processor, "assistant", ":")
    assert all(batch["input_ids"][r, -2:].tolist() == tail for r in range(len(rows)))
    second = processor.tokenizer.decode(batch["input_ids"][1][mask[1] == 1])
    assert second == "<s> user : how many ? assistant : 3 </s> user : is it ? assistant :"
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        alone = [model(**collator([row])).logits[0, -1] for row in rows]
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-4, rtol=1e-4)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)


def test_truncation_cuts_text_but_never_visual_tokens(media: dict[str, str]) -> None:
    processor = build_tiny_processor("llava")
    row = {"id": "long", "images": [media["a"]], "messages": _chat("<image>\nWhat colour is the big dot?", "red")}
    full = VLMChatCollator(processor, 128, "llava")([row])["input_ids"].shape[1]
    cut = VLMChatCollator(processor, full - 2, "llava")([row])
    assert all(v.shape[1] == full - 2 for k, v in cut.items() if k in ("input_ids", "attention_mask", "labels"))
    with pytest.raises(ValueError, match=r"would cut image/video tokens of row\(s\) 'long'"):
        VLMChatCollator(processor, 10, "llava")([row])
    with pytest.raises(ValueError, match=r"cannot be cut for generation: 'long'"):
        VLMChatCollator(processor, 10, "llava", for_generation=True)([row])


def test_validate_lengths_names_file_and_row(tmp_path: Path, media: dict[str, str]) -> None:
    def row(row_id: str, question: str) -> dict:
        return {"id": row_id, "image": "a.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "red"}
        ]}  # fmt: skip

    rows = [row("short", "<image>?"), row("long", "<image>\n" + "what colour is the dot " * 4)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    dataset = load_llava_json(path, Path(media["a"]).parent)
    collator = VLMChatCollator(build_tiny_processor("llava"), 30, "llava")
    with pytest.raises(DataFormatError) as caught:
        validate_lengths(dataset, collator)
    [message] = caught.value.errors
    assert message.startswith(f"{path}: row 1 (id 'long'): ")
    assert "2 answer tokens lie past max_length=30" in message
    validate_lengths(dataset, collator, max_length=64)


def test_row_and_family_mismatches_are_refused(media: dict[str, str], clip_frames: np.ndarray) -> None:
    processor = build_tiny_processor("llava")
    collator = VLMChatCollator(processor, 64, "llava")
    with pytest.raises(ValueError, match=r"row 'x': 2 <image> marker\(s\) but 1 images"):
        collator([{"id": "x", "images": [media["a"]], "messages": _chat("<image><image>?", "no")}])
    with pytest.raises(ValueError, match="model family 'llava' takes no videos"):
        collator([{"id": "v", "videos": [clip_frames], "messages": _chat("<video>?", "no")}])
    with pytest.raises(ValueError, match="unknown model_family"):
        VLMChatCollator(processor, 64, "llama")


def test_templates_without_eos_or_processors_without_template(media: dict[str, str]) -> None:
    """Released LLaVA templates end answers with a space, not EOS: EOS is added and supervised.

    A processor with no chat template falls back to the plain LLaVA-1.5 format.
    """
    row = {"id": "r", "images": [media["a"]], "messages": _chat("<image>\nWhat colour?", "red", "Shape?", "circle")}
    reference = VLMChatCollator(build_tiny_processor("llava"), 128, "llava")([row])
    bare = build_tiny_processor("llava")
    bare.chat_template = None
    fallback = VLMChatCollator(bare, 128, "llava")([row])
    assert all(torch.equal(reference[k], fallback[k]) for k in reference)
    hf_style = build_tiny_processor("llava")
    hf_style.chat_template = (  # the shape of llava-hf/llava-1.5-7b-hf's template
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    batch = VLMChatCollator(hf_style, 128, "llava")([row])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert hf_style.tokenizer.decode(ids[labels != IGNORE_INDEX]) == "red </s> circle </s>"


def test_clip_collator_and_loss(tmp_path: Path, media: dict[str, str]) -> None:
    for name in ("red", "blue", "green"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        Image.open(media["a"]).save(tmp_path / "tree" / name / "x.png")
    Image.open(media["wide"]).save(tmp_path / "tree" / "red" / "y.png")
    dataset = load_classification(tmp_path / "tree")
    processor = build_tiny_processor("clip")
    collator = ClipCollator(processor, dataset.features["label"].names)
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["labels"].tolist() == dataset["label"]
    assert batch["input_ids"].shape[0] == 3 and torch.all(batch["input_ids"][:, 0] == 1)
    loss = clip_classification_loss(build_tiny("clip").model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(ClipCollator(processor)([dataset[0]])) == {"pixel_values", "labels"}
