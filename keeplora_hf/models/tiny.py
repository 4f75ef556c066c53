"""Tiny, randomly initialised vision-language models of the real transformers classes.

Nothing here touches the Hugging Face Hub: every model is built from a config with random
weights, so tests exercise the real module names, merging code and loss computation of each
architecture on a CPU in a few tens of milliseconds per step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

__all__ = ["Batch", "TINY_MODELS", "TinyVLM", "build_tiny", "matching_modules"]

# Keyword arguments for `model(**batch)`: tensors, plus the `return_loss=True` flag for CLIP.
Batch = dict[str, torch.Tensor | bool]

# Shared sizes: small enough for ~10-30 ms forward+backward on two CPU cores.
VOCAB_SIZE = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
IMAGE_SIZE = 16
PATCH_SIZE = 4
NUM_FRAMES = 2
TEXT_PREFIX = 4  # text tokens before the visual placeholders
TEXT_SUFFIX = 6  # text tokens after them

# Special ids live at the top of the vocabulary; ordinary text is drawn below FIRST_SPECIAL_ID.
BOS_ID = 1
EOS_ID = 2
PAD_ID = 0
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
VIDEO_TOKEN_ID = VOCAB_SIZE - 2
VISION_START_ID = VOCAB_SIZE - 3
VISION_END_ID = VOCAB_SIZE - 4
FIRST_SPECIAL_ID = VOCAB_SIZE - 4
FIRST_TEXT_ID = 3

# Decoder-only language models (Llama, Qwen2): attention and MLP projections of every layer.
_DECODER_LEAVES = r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
# CLIP encoder layers name the attention output `out_proj`.
_CLIP_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"

TINY_MODELS: tuple[str, ...] = ("llava", "llava_next_video", "video_llava", "qwen2_vl", "clip")


@dataclass
class TinyVLM:
    """A tiny model plus a deterministic batch factory and peft `target_modules` regexes."""

    name: str
    model: torch.nn.Module
    make_batch: Callable[[int, int], Batch]
    language_targets: str
    vision_targets: str


def matching_modules(model: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Module]:
    """Modules whose full name matches `pattern` the way peft matches a string (`re.fullmatch`)."""
    return {name: module for name, module in model.named_modules() if re.fullmatch(pattern, name)}


def _text_ids(generator: torch.Generator, batch_size: int, length: int) -> torch.Tensor:
    """Ordinary text tokens, never colliding with special ids."""
    return torch.randint(FIRST_TEXT_ID, FIRST_SPECIAL_ID, (batch_size, length), generator=generator)


def _placeholder_batch(
    generator: torch.Generator,
    batch_size: int,
    placeholder_id: int,
    num_placeholders: int,
    start_id: int | None = None,
    end_id: int | None = None,
) -> Batch:
    """`bos, text, [start], placeholders..., [end], text` with labels ignoring the placeholders.

    Every row carries exactly `num_placeholders` placeholder tokens, the count the model's merging
    code checks against the number of visual features.
    """
    columns = [torch.full((batch_size, 1), BOS_ID), _text_ids(generator, batch_size, TEXT_PREFIX)]
    if start_id is not None:
        columns.append(torch.full((batch_size, 1), start_id))
    columns.append(torch.full((batch_size, num_placeholders), placeholder_id))
    if end_id is not None:
        columns.append(torch.full((batch_size, 1), end_id))
    columns.append(_text_ids(generator, batch_size, TEXT_SUFFIX))
    input_ids = torch.cat(columns, dim=1).long()
    labels = input_ids.masked_fill(input_ids == placeholder_id, -100)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _llama_config() -> LlamaConfig:
    """Tiny Llama decoder used as the language model of the LLaVA family."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )


def _clip_vision_config() -> CLIPVisionConfig:
    """Tiny CLIP vision tower: 16x16 images in 4x4 patches give 16 patch tokens plus CLS."""
    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        projection_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        attention_dropout=0.0,
    )


_PATCHES_PER_SIDE = IMAGE_SIZE // PATCH_SIZE
_NUM_PATCHES = _PATCHES_PER_SIDE**2


def _pixels(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


#: what the LLaVA-family configs share besides their towers (see `_build_llava`)
_LLAVA_FAMILY = {
    "image_token_index": IMAGE_TOKEN_ID,
    "image_seq_length": _NUM_PATCHES,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}
_LLAMA_TARGETS = rf"model\.language_model\.layers\.\d+\.{_DECODER_LEAVES}"


def _clip_tower_targets(tower: str) -> str:
    """The attention projections of the CLIP tower `model.<tower>` of a LLaVA-family model."""
    return rf"model\.{tower}\.(vision_model\.)?encoder\.layers\.\d+\.{_CLIP_ATTENTION}"


def _visual_batches(placeholder: int, count: int, pixels_key: str, *pixels_shape: int) -> Callable[[int, int], Batch]:
    """Batch factory: `count` placeholders per row (`_placeholder_batch`), and random pixels under `pixels_key`, of
    shape `(batch_size, *pixels_shape)`."""

    def make_batch(batch_size: int, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        batch = _placeholder_batch(generator, batch_size, placeholder, count)
        batch[pixels_key] = _pixels(generator, batch_size, *pixels_shape)
        return batch

    return make_batch


def _build_llava() -> tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]:
    """LLaVA-1.5 layout: CLIP vision tower, MLP projector, Llama decoder.

    `vision_feature_layer=-1` (real checkpoints use -2) so every vision layer feeds the loss and
    every vision adapter receives a gradient; "default" strategy drops CLS, leaving 16 tokens.
    """
    config = LlavaConfig(vision_config=_clip_vision_config(), text_config=_llama_config(), **_LLAVA_FAMILY)
    model = LlavaForConditionalGeneration(config)
    make_batch = _visual_batches(IMAGE_TOKEN_ID, _NUM_PATCHES, "pixel_values", 3, IMAGE_SIZE, IMAGE_SIZE)
    return model, make_batch, _LLAMA_TARGETS, _clip_tower_targets("vision_tower")


def _build_llava_next_video() -> tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]:
    """LLaVA-NeXT-Video: frames go through the CLIP tower, a 2x2 average pool, then the projector.

    Each frame's 4x4 patch grid pools to 2x2, so a video has NUM_FRAMES * 4 placeholder tokens.
    """
    stride = 2
    num_video_tokens = NUM_FRAMES * (_PATCHES_PER_SIDE // stride) ** 2
    config = LlavaNextVideoConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_config(),
        video_token_index=VIDEO_TOKEN_ID,
        spatial_pool_mode="average",
        spatial_pool_stride=stride,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        video_seq_length=num_video_tokens,
        **_LLAVA_FAMILY,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    make_batch = _visual_batches(
        VIDEO_TOKEN_ID, num_video_tokens, "pixel_values_videos", NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE
    )
    return model, make_batch, _LLAMA_TARGETS, _clip_tower_targets("vision_tower")


def _build_video_llava() -> tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]:
    """Video-LLaVA: separate image and video CLIP towers sharing one projector.

    Batches feed videos only, so `vision_targets` names the video tower (the image tower would
    never run and its adapters would see neither activations nor gradients). Video features keep
    CLS, hence NUM_FRAMES * (16 + 1) placeholders.
    """
    num_video_tokens = NUM_FRAMES * (_NUM_PATCHES + 1)
    config = VideoLlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_config(),
        video_token_index=VIDEO_TOKEN_ID,
        video_seq_length=num_video_tokens,
        **_LLAVA_FAMILY,
    )
    model = VideoLlavaForConditionalGeneration(config)
    make_batch = _visual_batches(
        VIDEO_TOKEN_ID, num_video_tokens, "pixel_values_videos", NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE
    )
    return model, make_batch, _LLAMA_TARGETS, _clip_tower_targets("video_tower")


def _build_qwen2_vl() -> tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]:
    """Qwen2-VL: native-resolution ViT with fused `qkv`, 2x2 patch merger, M-RoPE decoder.

    A 16x16 image in 4x4 patches is a (1, 4, 4) grid of 16 patches, merged into 4 tokens.
    `pixel_values` holds flattened patches `(sum(t*h*w), C * temporal_patch * patch * patch)`
    and `mm_token_type_ids` marks image tokens (1) so M-RoPE positions are computed.
    """
    patch, temporal_patch, merge = PATCH_SIZE, 2, 2
    head_dim = HIDDEN // HEADS
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "max_position_embeddings": 128,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                # Sections of head_dim // 2 rotary frequencies for temporal, height, width.
                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
            },
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": LAYERS,
            "embed_dim": HIDDEN,
            "hidden_size": HIDDEN,
            "mlp_ratio": 2,
            "num_heads": HEADS,
            "in_channels": 3,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": temporal_patch,
        },
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    grid = (1, _PATCHES_PER_SIDE, _PATCHES_PER_SIDE)
    patches_per_image = grid[0] * grid[1] * grid[2]
    tokens_per_image = patches_per_image // merge**2
    patch_dim = 3 * temporal_patch * patch * patch

    def make_batch(batch_size: int, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        batch = _placeholder_batch(
            generator, batch_size, IMAGE_TOKEN_ID, tokens_per_image, VISION_START_ID, VISION_END_ID
        )
        batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN_ID).int()
        batch["pixel_values"] = _pixels(generator, batch_size * patches_per_image, patch_dim)
        batch["image_grid_thw"] = torch.tensor([grid] * batch_size, dtype=torch.long)
        return batch

    vision = r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"
    return model, make_batch, _LLAMA_TARGETS, vision


def _build_clip() -> tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]:
    """CLIP dual encoder trained with its own contrastive loss (`return_loss=True`).

    Text rows end with the EOS id, where CLIP pools the text embedding; EOS is not 2, so the
    model uses the first-EOS pooling path rather than the legacy argmax one.
    """
    eos_id = VOCAB_SIZE - 1
    text_length = 8
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            projection_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=16,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=eos_id,
            attention_dropout=0.0,
        ),
        vision_config=_clip_vision_config(),
        projection_dim=HIDDEN,
    )
    model = CLIPModel(config)

    def make_batch(batch_size: int, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        body = torch.randint(FIRST_TEXT_ID, eos_id, (batch_size, text_length - 2), generator=generator)
        input_ids = torch.cat(
            [torch.full((batch_size, 1), BOS_ID), body, torch.full((batch_size, 1), eos_id)], dim=1
        ).long()
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": _pixels(generator, batch_size, 3, IMAGE_SIZE, IMAGE_SIZE),
            "return_loss": True,
        }

    language = rf"text_model\.encoder\.layers\.\d+\.{_CLIP_ATTENTION}"
    vision = rf"vision_model\.encoder\.layers\.\d+\.{_CLIP_ATTENTION}"
    return model, make_batch, language, vision


_BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, Callable[[int, int], Batch], str, str]]] = {
    "llava": _build_llava,
    "llava_next_video": _build_llava_next_video,
    "video_llava": _build_video_llava,
    "qwen2_vl": _build_qwen2_vl,
    "clip": _build_clip,
}
assert tuple(_BUILDERS) == TINY_MODELS


def build_tiny(name: str, seed: int = 0) -> TinyVLM:
    """Build tiny model `name` with weights drawn from `seed`, in float32.

    The global torch RNG is forked, so building a model never perturbs the caller's random state.
    All dropout probabilities are zero, so train and eval mode compute the same loss.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, make_batch, language, vision = _BUILDERS[name]()
    model = model.float()
    return TinyVLM(
        name=name, model=model, make_batch=make_batch, language_targets=language, vision_targets=vision
    )
