"""The demo's CLIP: a tiny `CLIPModel` (the real transformers class) that the project pre-trains itself, for the
embedded MTIL-style classification sequence (`keeplora-hf demo --clip`).

Its vision tower is the demo VLM's (4 layers, hidden 64, 4x4 patches of 32x32 images), its text tower 4 layers of
hidden 64 over the demo's word-level vocabulary, both projected to 64. Prompts are "<question> <answer>" (the
synthetic benchmark's questions), so the text tower tells tasks that share answer words apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from .demo import (
    DEMO_IMAGE_SIZE,
    DEMO_PATCH_SIZE,
    DEMO_SQUARE,
    DEMO_VOCAB_SIZE,
    demo_tokenizer,
    load_pretrained,
)
from .processors import CLIP_EOS_ID, CLIP_MAX_LENGTH
from .tiny import BOS_ID, PAD_ID

SHIPPED_CLIP_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "demo_clip"

# Every attention and MLP projection of both towers: the tasks need new visual features (a frame's colour, a digit)
# and new readings of old words (which object a colour question is about).
DEMO_CLIP_TARGETS = r"(vision_model|text_model)\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


def demo_clip_config() -> CLIPConfig:
    width = 64
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4,
                 attention_dropout=0.0, projection_dim=width)
    text = dict(tower, vocab_size=DEMO_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, pad_token_id=PAD_ID,
                bos_token_id=BOS_ID, eos_token_id=CLIP_EOS_ID)  # a non-2 EOS: CLIP pools at the first EOS
    vision = dict(tower, image_size=DEMO_IMAGE_SIZE, patch_size=DEMO_PATCH_SIZE)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def build_demo_clip(seed: int = 0) -> CLIPModel:
    """A randomly initialised demo CLIP, the starting point of `keeplora-hf pretrain-clip`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(demo_clip_config())


def build_demo_clip_processor() -> CLIPProcessor:
    return CLIPProcessor(image_processor=CLIPImageProcessor(**DEMO_SQUARE), tokenizer=demo_tokenizer("clip"))


def load_demo_clip(path: str | Path | None = None) -> tuple[CLIPModel, CLIPProcessor]:
    """The pre-trained demo CLIP and its processor, from `path` or the checkpoint shipped with the package."""
    return load_pretrained(CLIPModel, path, SHIPPED_CLIP_CHECKPOINT, "demo CLIP", "pretrain-clip")
