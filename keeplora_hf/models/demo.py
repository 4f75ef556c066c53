"""The demo's vision-language model: a small LLaVA (the real transformers classes) that the project pre-trains itself.

CLIP vision tower (4 layers, hidden 64, 4x4 patches of 32x32 images = 64 image tokens), MLP projector, Llama
decoder (4 layers, hidden 128), word-level vocabulary. About 1.3M parameters: big enough to hold several general
skills, small enough to pre-train and run whole continual benchmarks on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    LlavaProcessor,
)

from .processors import CHAT_TEMPLATE, TINY_VOCABULARY, build_tiny_tokenizer
from .tiny import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, VIDEO_TOKEN_ID

DEMO_IMAGE_SIZE = 32
DEMO_PATCH_SIZE = 4
DEMO_VOCAB_SIZE = 256
DEMO_IMAGE_TOKENS = (DEMO_IMAGE_SIZE // DEMO_PATCH_SIZE) ** 2
VIDEO_POOL_STRIDE = 2
VIDEO_FRAMES = 8
VIDEO_MAX_LENGTH = 256  # 8 frames x 16 pooled patches = 128 video tokens, plus the question
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "demo_vlm"

# KeepLoRA targets of the demo model: every attention and MLP projection of the language model, and of the vision
# tower (the benchmark's tasks need new visual features, e.g. reading digits, that a frozen tower would not give)
DEMO_LANGUAGE_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
DEMO_VISION_TARGETS = r"model\.vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
DEMO_TARGETS = f"({DEMO_LANGUAGE_TARGETS})|({DEMO_VISION_TARGETS})"


def demo_vocabulary() -> tuple[str, ...]:
    """The tiny models' word list, which covers every word of the synthetic benchmark (tests check it)."""
    return TINY_VOCABULARY


def demo_config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=DEMO_IMAGE_SIZE,
        patch_size=DEMO_PATCH_SIZE,
        attention_dropout=0.0,
    )
    text = LlamaConfig(
        vocab_size=DEMO_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    # the last vision layer feeds the projector, so every vision layer learns (real LLaVA uses -2 of 24 layers)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=DEMO_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_demo_model(seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised demo model, the starting point of `keeplora-hf pretrain`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(demo_config())


DEMO_SQUARE = {"size": {"shortest_edge": DEMO_IMAGE_SIZE}, "crop_size": {"height": DEMO_IMAGE_SIZE, "width": DEMO_IMAGE_SIZE}}
_PLACEHOLDERS = {"patch_size": DEMO_PATCH_SIZE, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def demo_tokenizer(family: str = "llava"):
    """The demo vocabulary with `family`'s special tokens ("llava" for the demo VLM, "clip" for the demo CLIP)."""
    return build_tiny_tokenizer(family, words=demo_vocabulary(), vocab_size=DEMO_VOCAB_SIZE)


def build_demo_processor() -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(**DEMO_SQUARE), tokenizer=demo_tokenizer(), chat_template=CHAT_TEMPLATE,
        **_PLACEHOLDERS,
    )


def build_demo_video_processor() -> LlavaNextVideoProcessor:
    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(**DEMO_SQUARE),
        image_processor=LlavaNextImageProcessor(**DEMO_SQUARE, image_grid_pinpoints=[[DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE]]),
        tokenizer=demo_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        **_PLACEHOLDERS,
    )


def video_model_from_image_model(image_model: LlavaForConditionalGeneration) -> LlavaNextVideoForConditionalGeneration:
    """A LLaVA-NeXT-Video whose vision tower, projector and language model are the pre-trained image model's.

    Frames go through the same tower, are pooled 2x2 and projected, so the video model starts with the image
    model's general knowledge and only has to learn what time adds.
    """
    image_config = image_model.config
    config = LlavaNextVideoConfig(
        vision_config=image_config.vision_config.to_dict(),
        text_config=image_config.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=image_config.vision_feature_layer,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=VIDEO_POOL_STRIDE,
        image_grid_pinpoints=[[DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE]],
        image_seq_length=DEMO_IMAGE_TOKENS,
        video_seq_length=VIDEO_FRAMES * (DEMO_IMAGE_SIZE // DEMO_PATCH_SIZE // VIDEO_POOL_STRIDE) ** 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaNextVideoForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(image_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"model.image_newline"}:
        raise RuntimeError(f"image and video models differ: missing {missing}, unexpected {unexpected}")
    return model


def load_demo_model(path: str | Path | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The pre-trained demo model and its processor, from `path` or the checkpoint shipped with the package."""
    return load_pretrained(LlavaForConditionalGeneration, path, SHIPPED_CHECKPOINT, "demo model", "pretrain")


def load_pretrained(model_class: type, path: str | Path | None, shipped: Path, what: str, command: str) -> tuple:
    """A demo checkpoint in float32 and its processor, from `path` or `shipped`; a missing one names the
    `keeplora-hf` `command` that makes it."""
    path = Path(path) if path is not None else shipped
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no pre-trained {what} at {path}; create one with `keeplora-hf {command} --output-dir {path}`"
        )
    return model_class.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)
