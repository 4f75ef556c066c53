"""Model loading by family: a chat VLM or CLIP, from a checkpoint (optionally quantized) or `tiny:<name>`.

`model_name_or_path: tiny:<name>` builds a tiny random-weight model of the same architecture from a config
(`keeplora_hf.models.build_tiny`) and its offline processor, so every recipe runs on a CPU without the Hub.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arguments import ModelArguments

__all__ = ["FAMILY_OF_MODEL_TYPE", "PROJECTOR_MODULES", "VIDEO_FAMILIES", "load_clip", "load_vlm"]

TINY_PREFIX = "tiny:"
# The collator family of each transformers model_type (`VLMChatCollator`'s model_family).
FAMILY_OF_MODEL_TYPE = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava",
    "llava_next_video": "llava_next_video",
    "video_llava": "video_llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "clip": "clip",
}
# The vision-to-language projector of each family, trained fully through peft's modules_to_save.
PROJECTOR_MODULES = {
    "llava": ["multi_modal_projector"],
    "llava_next_video": ["multi_modal_projector"],
    "video_llava": ["multi_modal_projector"],
    "qwen2_vl": ["merger"],
}
# The chat families whose recipes read clips (video_llm); the others read images unless a task names `video_folder`.
VIDEO_FAMILIES = ("video_llava", "llava_next_video")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _quantization_config(args: ModelArguments, family: str) -> Any:
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    if args.load_in_4bit and args.load_in_8bit:
        raise ValueError("choose load_in_4bit or load_in_8bit, not both")
    from transformers import BitsAndBytesConfig

    skip = list(args.quantization_skip_modules or [])
    skip += list(args.projector_modules or PROJECTOR_MODULES.get(family, [])) + ["lm_head"]
    if args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=_dtype(args.bnb_4bit_compute_dtype),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _pretrained_class(model_type: str) -> Any:
    import transformers

    specific = {
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "llava_next_video": "LlavaNextVideoForConditionalGeneration",
        "video_llava": "VideoLlavaForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    name = specific.get(model_type)
    return getattr(transformers, name) if name else transformers.AutoModelForImageTextToText


def load_vlm(args: ModelArguments) -> tuple[nn.Module, Any, str]:
    """(model, processor, collator family) of a chat VLM: a tiny one built from a config, or a checkpoint."""
    if args.model_name_or_path.startswith(TINY_PREFIX):
        from ..models import build_tiny, build_tiny_processor

        name = args.model_name_or_path[len(TINY_PREFIX) :]
        if name == "clip":
            raise ValueError("tiny:clip is a CLIP model: use the clip_mtil recipe")
        family = args.model_family or name
        model = build_tiny(name).model.to(_dtype(args.torch_dtype) if args.torch_dtype != "auto" else torch.float32)
        return model, build_tiny_processor(name), family
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    family = args.model_family or FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family is None or family == "clip":
        raise ValueError(
            f"{args.model_name_or_path}: model_type {config.model_type!r} has no chat collator family; set "
            f"model_family to one of llava, llava_next_video, video_llava, qwen2_vl"
        )
    kwargs: dict[str, Any] = {"dtype": _dtype(args.torch_dtype), "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    quantization = _quantization_config(args, family)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = _pretrained_class(config.model_type).from_pretrained(args.model_name_or_path, **kwargs)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    processor = AutoProcessor.from_pretrained(
        args.processor_name_or_path or args.model_name_or_path, trust_remote_code=args.trust_remote_code, **pixels
    )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:  # LLaVA-1.5's Llama tokenizer has none; pad with unk like the reference
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, processor, family


def load_clip(args: ModelArguments) -> tuple[nn.Module, Any]:
    """(CLIPModel, CLIPProcessor): the tiny one or a checkpoint."""
    if args.model_name_or_path.startswith(TINY_PREFIX):
        from ..models import build_tiny, build_tiny_processor

        name = args.model_name_or_path[len(TINY_PREFIX) :]
        if name != "clip":
            raise ValueError(f"the clip_mtil recipe needs tiny:clip, got {args.model_name_or_path}")
        return build_tiny("clip").model, build_tiny_processor("clip")
    from transformers import CLIPModel, CLIPProcessor

    kwargs: dict[str, Any] = {"dtype": _dtype(args.torch_dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = CLIPModel.from_pretrained(args.model_name_or_path, **kwargs)
    processor = CLIPProcessor.from_pretrained(args.processor_name_or_path or args.model_name_or_path)
    return model, processor
