"""The benchmark on disk, in the formats real datasets use, so the loaders of `keeplora_hf.data` serve both.

Every file is written to a temporary name beside it and renamed into place, so a reader never sees a partial
image, clip or JSON file; `manifest.json` is written last, so its presence means the build completed. The JSON
files hold only relative paths and generated values, so the same seed gives byte-identical JSON wherever and
however often the benchmark is built.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..formats import IMAGE_MARKER
from ..video import write_video
from .scenes import IMAGE_SIZE
from .tasks import (
    GENERAL_SKILLS,
    IMAGE_TASKS,
    TASK_SPECS,
    Sample,
    TaskSpec,
    general_corpus,
    general_eval_suite,
    make_task,
)
from .videos import NUM_FRAMES, VIDEO_SPECS, VIDEO_TASKS, VideoSample, make_video_task
from .vocabulary import WORDS

__all__ = ["FORMAT", "MANIFEST_NAME", "write_benchmark", "write_llava_json", "write_video_qa_json"]

MANIFEST_NAME = "manifest.json"
# 2: red_side and above_below redrawn (learnable at the demo budget); data of another format is other tasks
FORMAT = "keeplora-synthetic/2"
_TEMP_PREFIX = ".tmp-"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write` on a temporary file with `path`'s suffix (encoders pick the format from it), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would make shared benchmark files unreadable to others
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda temporary: temporary.write_bytes(data))


def _write_json(path: Path, payload: Any) -> None:
    _write_bytes(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())


def _media_folder(out_dir: Path, kind: str, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"dataset name must be a plain file name, got {name!r}")
    return out_dir / kind / name


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove files a previous, larger build (or a killed one) left in a media folder this dataset owns."""
    for stale in folder.iterdir():
        if stale.is_file() and stale.name not in keep:
            stale.unlink()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_llava_json(samples: Sequence[Sample], out_dir: str | os.PathLike, name: str) -> Path:
    """Write `images/<name>/<i>.png` and `<name>.json` (a LLaVA conversation list) under `out_dir`.

    Samples need `image` (PIL), `question` and `answer`. Image paths in the JSON are relative to `out_dir`, the
    `image_folder` of `load_llava_json`. Returns the JSON path.
    """
    out_dir = Path(out_dir)
    folder = _media_folder(out_dir, "images", name)
    rows = []
    for index, sample in enumerate(samples):
        relative = f"images/{name}/{index}.png"
        _write_bytes(out_dir / relative, _png(sample.image))
        conversation = [
            {"from": "human", "value": f"{IMAGE_MARKER}\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ]
        rows.append({"id": f"{name}-{index}", "image": relative, "conversations": conversation})
    folder.mkdir(parents=True, exist_ok=True)
    _prune(folder, {f"{index}.png" for index in range(len(samples))})
    path = out_dir / f"{name}.json"
    _write_json(path, rows)
    return path


def write_video_qa_json(
    samples: Sequence[VideoSample], out_dir: str | os.PathLike, name: str, fps: int = 4
) -> Path:
    """Write `videos/<name>/<i>.mp4` (PyAV) and `<name>.json` as `[{"id", "video", "question", "answer"}]`.

    Video paths are relative to `out_dir`, the `video_folder` of `load_video_qa_json`. Returns the JSON path.
    """
    out_dir = Path(out_dir)
    folder = _media_folder(out_dir, "videos", name)
    rows = []
    for index, sample in enumerate(samples):
        relative = f"videos/{name}/{index}.mp4"
        _atomic(out_dir / relative, lambda temporary, frames=sample.frames: write_video(temporary, frames, fps))
        rows.append({"id": f"{name}-{index}", "video": relative, "question": sample.question, "answer": sample.answer})
    folder.mkdir(parents=True, exist_ok=True)
    _prune(folder, {f"{index}.mp4" for index in range(len(samples))})
    path = out_dir / f"{name}.json"
    _write_json(path, rows)
    return path


def _entry(path: Path, out_dir: Path, samples: Sequence[Any]) -> dict[str, Any]:
    counts = Counter(sample.answer for sample in samples)
    return {
        "path": path.relative_to(out_dir).as_posix(),
        "count": len(samples),
        "answer_counts": dict(sorted(counts.items())),
    }


def _spec(spec: TaskSpec) -> dict[str, Any]:
    return {
        "question": spec.question,
        "answers": list(spec.answers),
        "chance": round(spec.chance, 6),
        "cue": spec.cue,
        "interferes_with": spec.interferes_with,
    }


def write_benchmark(
    out_dir: str | os.PathLike,
    general_size: int = 3000,
    general_eval_size: int = 500,
    train_size: int = 400,
    eval_size: int = 200,
    tasks: Sequence[str] = IMAGE_TASKS,
    videos: bool = False,
    video_train_size: int = 200,
    video_eval_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the general corpus, its held-out eval suite, train/eval splits of `tasks` (and of the video tasks
    when `videos`) under `out_dir`, then `manifest.json`; return the manifest.

    The manifest records, per dataset, its JSON path (relative to `out_dir`, which is also the media folder to
    pass to the loaders), sample count and answer counts, and per task its question, answers and chance level;
    `image_task_order` is the continual sequence.
    """
    unknown = [name for name in tasks if name not in TASK_SPECS]
    if unknown:
        raise ValueError(f"unknown image task(s) {unknown}; choose from {IMAGE_TASKS}")
    out_dir = Path(out_dir)
    general = {
        "skills": {name: _spec(spec) for name, spec in GENERAL_SKILLS.items()},
    }
    for split, samples in (
        ("train", general_corpus(general_size, seed)),
        ("eval", general_eval_suite(general_eval_size, seed)),
    ):
        general[split] = _entry(write_llava_json(samples, out_dir, f"general_{split}"), out_dir, samples)
    image_tasks = {}
    for name in tasks:
        image_tasks[name] = _spec(TASK_SPECS[name])
        for split, size in (("train", train_size), ("eval", eval_size)):
            samples = make_task(name, split, size, seed)
            image_tasks[name][split] = _entry(write_llava_json(samples, out_dir, f"{name}_{split}"), out_dir, samples)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "words": list(WORDS),
        "general": general,
        "image_task_order": list(tasks),
        "image_tasks": image_tasks,
    }
    if videos:
        video_tasks = {}
        for name in VIDEO_TASKS:
            video_tasks[name] = _spec(VIDEO_SPECS[name])
            for split, size in (("train", video_train_size), ("eval", video_eval_size)):
                clips = make_video_task(name, split, size, seed)
                path = write_video_qa_json(clips, out_dir, f"video_{name}_{split}")
                video_tasks[name][split] = _entry(path, out_dir, clips)
        manifest.update(num_frames=NUM_FRAMES, video_task_order=list(VIDEO_TASKS), video_tasks=video_tasks)
    _write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest
