"""Task data: loaders that validate every row up front, collators per model family, video I/O."""

from .classification import load_classification
from .collators import (
    IGNORE_INDEX,
    MODEL_FAMILIES,
    ClipCollator,
    VLMChatCollator,
    clip_classification_loss,
    validate_lengths,
)
from .formats import IMAGE_MARKER, VIDEO_MARKER, load_llava_json, load_video_qa_json
from .rows import DataFormatError
from .video import VideoReadError, read_frames, write_video

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "MODEL_FAMILIES",
    "VIDEO_MARKER",
    "ClipCollator",
    "DataFormatError",
    "VLMChatCollator",
    "VideoReadError",
    "clip_classification_loss",
    "load_classification",
    "load_llava_json",
    "load_video_qa_json",
    "read_frames",
    "validate_lengths",
    "write_video",
]
