"""Models for the benchmarks, built from configs (nothing from the Hub): a ~100M-parameter LLaVA and the tiny default.

`llava_100m` keeps LLaVA-1.5's architecture (CLIP ViT tower, two-layer GELU projector, Llama decoder, the
`-2` vision feature layer, a 32000-token vocabulary) at a width that trains on a CPU: hidden 768, 8 decoder layers,
MLP 2048; a 6-layer ViT of width 384 on 112x112 images in 14x14 patches (64 image tokens). KeepLoRA++ targets
the decoder's q, k, v, o, gate, up and down projections, as the LLaVA recipes do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from keeplora_hf.models import build_tiny

LLAVA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

VOCAB = 32000
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE, PATCH = 112, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    make_batch: Callable[[int, int], dict]
    targets: str
    batch_size: int
    description: str


def llava_100m(seed: int = 0, text_tokens: int = 64) -> BenchModel:
    """LLaVA-1.5 architecture at ~117M parameters; batches of `text_tokens` text + 64 image tokens."""
    return _llava("llava-100m", seed, text_tokens, width=768, mlp=2048, layers=8, heads=12, dtype=torch.float32)


def llava_7b_proportions_bf16(seed: int = 0, text_tokens: int = 64) -> BenchModel:
    """LLaVA-1.5-7B's proportions (MLP = 2.75 x width) at width 512, 6 decoder layers, in bfloat16 as users train."""
    return _llava("llava-7bp-bf16", seed, text_tokens, width=512, mlp=1408, layers=6, heads=8, dtype=torch.bfloat16)


def llava_1b_f32(seed: int = 0, text_tokens: int = 16) -> BenchModel:
    """LLaVA-1.5 architecture at ~1.0B parameters in float32 (Llama 32 x 1536, MLP 4224 = 2.75 x width, as 7B): big
    enough that its weights and KeepLoRA state, not the interpreter, dominate a CPU process's memory."""
    return _llava("llava-1b-f32", seed, text_tokens, width=1536, mlp=4224, layers=32, heads=12, dtype=torch.float32)


def _llava(name: str, seed: int, text_tokens: int, *, width: int, mlp: int, layers: int, heads: int,
           dtype: torch.dtype) -> BenchModel:
    vision = CLIPVisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=384,
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.config.use_cache = False
    prefix = text_tokens // 4

    def make_batch(batch_size: int, batch_seed: int) -> dict:
        g = torch.Generator().manual_seed(batch_seed)
        # a learnable text: each row repeats a short random phrase, so the loss falls within an epoch
        phrase = torch.randint(3, 512, (batch_size, 8), generator=g)
        body = phrase.repeat(1, text_tokens // 8 + 1)[:, : text_tokens - prefix]
        ids = torch.cat(
            [torch.ones(batch_size, 1, dtype=torch.long), torch.randint(3, 512, (batch_size, prefix - 1), generator=g),
             torch.full((batch_size, IMAGE_TOKENS), IMAGE_TOKEN), body],
            dim=1,
        )
        labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
        labels[:, :prefix] = -100
        pixels = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": labels}

    params = sum(p.numel() for p in model.parameters())
    return BenchModel(
        name, model, make_batch, LLAVA_TARGETS, 4,
        f"LLaVA-1.5 architecture, {params / 1e6:.0f}M parameters (ViT 6x384, Llama {layers}x{width}, MLP {mlp}, vocab "
        f"{VOCAB}), {str(dtype).removeprefix('torch.')}; batch 4 x {text_tokens + IMAGE_TOKENS} tokens; targets "
        f"q,k,v,o,gate,up,down of the decoder ({7 * layers} layers)",
    )


def tiny(seed: int = 0) -> BenchModel:
    """The tiny LLaVA of the test suite (keeplora_hf.models.build_tiny), language and vision targets."""
    t = build_tiny("llava", seed)
    params = sum(p.numel() for p in t.model.parameters())
    return BenchModel(
        "tiny-llava", t.model, t.make_batch, f"({t.language_targets})|({t.vision_targets})", 4,
        f"tiny LLaVA of the tests ({params / 1e3:.0f}K parameters, width 32), language and vision targets",
    )


MODELS = {"llava-100m": llava_100m, "llava-1b-f32": llava_1b_f32, "llava-7bp-bf16": llava_7b_proportions_bf16, "tiny-llava": tiny}
