"""Model builders: tiny random-weight vision-language models for tests, no Hub access needed."""

from .tiny import TINY_MODELS, Batch, TinyVLM, build_tiny, matching_modules

__all__ = ["Batch", "TINY_MODELS", "TinyVLM", "build_tiny", "matching_modules"]
