"""Video tasks of the benchmark: 8-frame 32x32 clips whose answer lies in how frames differ, not in any one frame.

Each clip keeps one background level and noise strength across frames (one "camera"), so the only change over
time is the cue. Answers are balanced like the image tasks', so chance is `VIDEO_SPECS[name].chance`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, IMAGE_SIZE, Blob, blank, finish, paint, place_blob, random_background, random_colour
from .tasks import COUNT_WORDS, TaskSpec, balanced, task_rng

__all__ = ["NUM_FRAMES", "VIDEO_SPECS", "VIDEO_TASKS", "VideoSample", "make_video_task"]

NUM_FRAMES = 8


@dataclass(frozen=True)
class VideoSample:
    """One video question; `frames` is a (T, H, W, 3) uint8 RGB array."""

    frames: np.ndarray
    question: str
    answer: str
    skill: str = ""


VIDEO_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "direction", "which direction does the object move", ("left", "right", "up", "down"),
            "displacement of one blob, 2-3 pixels per frame",
        ),
        TaskSpec(
            "flash_count", "how many objects are in the video", COUNT_WORDS,
            "number of one-frame flashes of a dot, at a new place each time, with empty frames between them",
        ),
        TaskSpec(
            "first_colour", "what colour is the first object", COLOURS,
            "colour of the earliest of two or three blobs that appear one after another and stay",
        ),
    )
}
VIDEO_TASKS: tuple[str, ...] = tuple(VIDEO_SPECS)

# Per clip: the blobs visible in each frame.
Timeline = list[list[Blob]]


def _direction(rng: np.random.Generator, answer: str) -> Timeline:
    size = int(rng.integers(5, 8))
    speed = int(rng.integers(2, 4))
    travel = speed * (NUM_FRAMES - 1)
    start = int(rng.integers(0, IMAGE_SIZE - size - travel + 1))
    across = int(rng.integers(0, IMAGE_SIZE - size + 1))
    step = speed if answer in ("right", "down") else -speed
    origin = start if step > 0 else start + travel
    colour, shape = random_colour(rng), ("square", "circle")[int(rng.integers(2))]
    timeline = []
    for t in range(NUM_FRAMES):
        along = origin + step * t
        x, y = (along, across) if answer in ("left", "right") else (across, along)
        timeline.append([Blob(shape, colour, x, y, size, size)])
    return timeline


def _flash_count(rng: np.random.Generator, answer: str) -> Timeline:
    """One-frame flashes with at least one empty frame between them, so every flash is a separate event."""
    events = COUNT_WORDS.index(answer) + 1
    slack = NUM_FRAMES - (2 * events - 1)
    gaps = rng.multinomial(slack, np.full(events + 1, 1.0 / (events + 1)))
    timeline: Timeline = [[] for _ in range(NUM_FRAMES)]
    frame = int(gaps[0])
    for event in range(events):
        timeline[frame].append(place_blob(rng, random_colour(rng), 4, shape="circle"))
        frame += 2 + int(gaps[event + 1])
    return timeline


def _first_colour(rng: np.random.Generator, answer: str) -> Timeline:
    count = int(rng.integers(2, 4))
    colours = [answer]
    for _ in range(count - 1):
        colours.append(random_colour(rng, exclude=colours))
    blobs: list[Blob] = []
    for colour in colours:
        blobs.append(place_blob(rng, colour, int(rng.integers(5, 9)), avoid=blobs))
    appear = np.sort(rng.choice(NUM_FRAMES - 1, size=count, replace=False))
    return [[blob for blob, start in zip(blobs, appear) if start <= t] for t in range(NUM_FRAMES)]


_VIDEOS: dict[str, Callable[[np.random.Generator, str], Timeline]] = {
    "direction": _direction,
    "flash_count": _flash_count,
    "first_colour": _first_colour,
}


def _render(timeline: Timeline, rng: np.random.Generator) -> np.ndarray:
    background, noise = random_background(rng)
    frames = []
    for blobs in timeline:
        canvas = blank(background)
        for blob in blobs:
            paint(canvas, blob.mask(), blob.colour)
        frames.append(np.asarray(finish(canvas, noise, rng)))
    return np.stack(frames)


def make_video_task(name: str, split: str, n: int, seed: int = 0) -> list[VideoSample]:
    """`n` clips of video task `name` (one of `VIDEO_TASKS`) with balanced answers; splits are independent draws."""
    if name not in VIDEO_SPECS:
        raise ValueError(f"unknown video task {name!r}; choose from {VIDEO_TASKS}")
    spec = VIDEO_SPECS[name]
    rng = task_rng(seed, f"video/{name}", split)
    return [
        VideoSample(_render(_VIDEOS[name](rng, answer), rng), spec.question, answer, name)
        for answer in balanced(rng, n, spec.answers)
    ]
