"""Model builders: tiny random-weight vision-language models for tests, no Hub access needed."""

from .processors import (
    CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    TINY_VOCABULARY,
    build_tiny_processor,
    build_tiny_tokenizer,
    llava_chat_template,
)
from .tiny import TINY_MODELS, Batch, TinyVLM, build_tiny, matching_modules

__all__ = [
    "Batch",
    "CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "TINY_MODELS",
    "TINY_VOCABULARY",
    "TinyVLM",
    "build_tiny",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "llava_chat_template",
    "matching_modules",
]
