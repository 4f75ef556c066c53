"""Tiny synthetic data sets in the real formats, written by the tiny configs (`tiny_data: true`) at run time.

In the package, not in tests/: the recipe scripts and `keeplora-hf analyze --recipe` write them when a user runs a
tiny config (the CPU smoke run documented in recipes/README.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.video import write_video

__all__ = ["TINY_DATA_WRITERS", "write_tiny_classification_data", "write_tiny_video_data", "write_tiny_vqa_data"]

_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30),
            "purple": (140, 40, 180), "cyan": (30, 210, 210)}  # fmt: skip


def _image(path: Path, colour: str, rng: np.random.Generator, size: int = 16) -> None:
    pixels = np.clip(np.array(_COLOURS[colour]) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def write_tiny_vqa_data(root: str | os.PathLike, train: int = 8, eval_: int = 4) -> Path:
    """Three tiny LLaVA-format tasks (single image, multi-turn, two images with VQA answer lists, lettered choices)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    for split, count in (("train", train), ("eval", eval_)):
        rows: dict[str, list[dict]] = {"colour": [], "pair": [], "choice": []}
        for i in range(count):
            a, b = rng.choice(colours, 2)
            _image(root / "images" / f"{split}_{i}_a.png", str(a), rng)
            _image(root / "images" / f"{split}_{i}_b.png", str(b), rng)
            first = f"images/{split}_{i}_a.png"
            turns = [{"from": "human", "value": "<image>\nwhat colour is the image?"}, {"from": "gpt", "value": str(a)}]
            if i % 2:  # multi-turn
                answer = "yes" if a == b else "no"
                turns += [{"from": "human", "value": f"is it {b}?"}, {"from": "gpt", "value": answer}]
            rows["colour"].append({"id": f"colour-{split}-{i}", "image": first, "conversations": turns})
            same = "yes" if a == b else "no"
            rows["pair"].append({
                "id": f"pair-{split}-{i}", "image": [first, f"images/{split}_{i}_b.png"],
                "conversations": [{"from": "human", "value": "<image>\n<image>\nare the two images the same colour?"},
                                  {"from": "gpt", "value": same}],
                "answers": [same, same, "no" if same == "yes" else "yes"],
            })
            options = [str(a), str(b)] if i % 2 else [str(b), str(a)]
            rows["choice"].append({
                "id": f"choice-{split}-{i}", "image": first,
                "conversations": [{"from": "human",
                                   "value": f"<image>\nwhat colour is the image? a. {options[0]}, b. {options[1]}"},
                                  {"from": "gpt", "value": "a" if options[0] == a else "b"}],
            })
        for name, task_rows in rows.items():
            _write_json(root / name / f"{split}.json", task_rows)
    return root


def write_tiny_video_data(root: str | os.PathLike, train: int = 8, eval_: int = 4) -> Path:
    """Two tiny video-QA tasks: clips of 2 to 5 frames, question/answer rows (with options) and conversation rows."""
    root = Path(root)
    rng = np.random.default_rng(1)
    colours = ["red", "green", "blue", "yellow"]
    for split, count in (("train", train), ("eval", eval_)):
        first_rows, count_rows = [], []
        for i in range(count):
            length = 2 + i % 4
            sequence = [str(c) for c in rng.choice(colours, length)]
            frames = np.stack([
                np.clip(np.array(_COLOURS[c]) + rng.integers(-10, 11, (16, 16, 3)), 0, 255).astype(np.uint8)
                for c in sequence
            ])
            clip = root / "videos" / f"{split}_{i}.mp4"
            clip.parent.mkdir(parents=True, exist_ok=True)
            write_video(clip, frames)
            if i % 2:
                first_rows.append({"id": f"first-{split}-{i}", "video": clip.name,
                                   "question": "what colour is the first frame?", "answer": sequence[0]})
            else:
                first_rows.append({"id": f"first-{split}-{i}", "video": clip.name, "conversations": [
                    {"from": "human", "value": "<video>\nwhat colour is the first frame?"},
                    {"from": "gpt", "value": sequence[0]}]})
            count_rows.append({"id": f"last-{split}-{i}", "video": clip.name,
                               "question": "what colour is the last frame?", "options": sorted(colours),
                               "answer": sequence[-1]})
        _write_json(root / "first" / f"{split}.json", first_rows)
        _write_json(root / "last" / f"{split}.json", count_rows)
    return root


def write_tiny_classification_data(root: str | os.PathLike, train: int = 4, eval_: int = 2) -> Path:
    """Two tiny classification tasks: class folders (red/green/blue), and a CSV table (yellow/purple/cyan)."""
    root = Path(root)
    rng = np.random.default_rng(2)
    for split, count in (("train", train), ("eval", eval_)):
        for colour in ("red", "green", "blue"):
            for i in range(count):
                _image(root / "primary" / split / colour / f"{i}.png", colour, rng)
        lines = ["image,label"]
        for colour in ("yellow", "purple", "cyan"):
            for i in range(count):
                _image(root / "secondary" / "images" / f"{split}_{colour}_{i}.png", colour, rng)
                lines.append(f"images/{split}_{colour}_{i}.png,{colour}")
        (root / "secondary" / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# The tiny data set each kind of recipe writes into data_root with `tiny_data: true`.
TINY_DATA_WRITERS: dict[str, Callable[[Path], Path]] = {
    "image": write_tiny_vqa_data,
    "video": write_tiny_video_data,
    "classification": write_tiny_classification_data,
}
