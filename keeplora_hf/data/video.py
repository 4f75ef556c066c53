"""Reading and writing short clips with PyAV.

Video LLMs see a fixed number of frames per clip, so reading means uniform sampling over the whole clip.
Writing exists for the demo's synthetic clips and for tests: it must round-trip on a machine without any
system ffmpeg, which PyAV's bundled codecs guarantee.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

__all__ = ["VideoReadError", "read_frames", "write_video"]


class VideoReadError(ValueError):
    """A clip that cannot be opened or holds no decodable video frame; the message names the file."""


def _sample_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly from the first to the last frame, repeating frames of short clips."""
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def _decode(path: Path, num_frames: int, trust_header: bool) -> np.ndarray:
    """One decoding pass, keeping only the sampled frames when the header states the frame count."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(f"{path}: no video stream")
        stream = container.streams.video[0]
        declared = stream.frames if trust_header else 0
        wanted = _sample_indices(declared, num_frames) if declared > 0 else None
        keep = None if wanted is None else set(wanted.tolist())
        frames: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if keep is None or index in keep:
                frames[index] = frame.to_ndarray(format="rgb24")
            if wanted is not None and index >= wanted[-1]:
                break
    if wanted is None:
        if not frames:
            raise VideoReadError(f"{path}: the video stream holds no decodable frame")
        wanted = _sample_indices(len(frames), num_frames)
    elif len(frames) < len(keep):
        # The header overstated the length: sample what the stream really holds.
        return _decode(path, num_frames, trust_header=False)
    return np.stack([frames[int(i)] for i in wanted])


def read_frames(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """`num_frames` frames sampled uniformly over the clip at `path`, as a `(T, H, W, 3)` uint8 RGB array.

    Frames are decoded in order without seeking (exact for short clips, whose keyframes are sparse). When the
    container states its frame count, decoding stops at the last sampled frame and only sampled frames are kept,
    so memory does not grow with the clip's length.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    path = Path(path)
    try:
        return _decode(path, num_frames, trust_header=True)
    except (av.FFmpegError, OSError) as error:
        raise VideoReadError(f"{path}: cannot read video ({error})") from error


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 4) -> None:
    """Encode `(T, H, W, 3)` uint8 RGB `frames` at `path` (H and W even).

    libx264 in 4:4:4 at CRF 0 is lossless on the round trip, so synthetic clips keep their exact colours;
    builds of PyAV without it fall back to mpeg4 at the best quantiser (slightly lossy).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for the encoder, got {height}x{width}")
    if "libx264" in av.codecs_available:
        codec, pixel_format, options = "libx264", "yuv444p", {"crf": "0"}
    else:
        codec, pixel_format, options = "mpeg4", "yuv420p", {"qscale": "1"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
