"""32x32 scenes of flat-coloured blobs on a noisy dark background, drawn from a seeded numpy Generator.

The benchmark's model is a 4-layer ViT with 4x4 patches, so every cue is something a patch embedding sees at
once (a colour, where a blob is, how much of the image it covers): shapes are deliberately never a cue.
Drawing is plain numpy masks, so the same Generator state gives the same pixels on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "PALETTE",
    "SHAPES",
    "Blob",
    "Scene",
    "blank",
    "finish",
    "paint",
    "place_blob",
    "random_background",
    "random_colour",
    "render_scene",
]

IMAGE_SIZE = 32
# Far apart in RGB, so one 4x4 patch identifies the colour even under the strongest noise used here.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 40),
    "green": (50, 190, 70),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 50),
    "white": (240, 240, 240),
    "purple": (160, 60, 210),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("square", "circle", "bar")
_MAX_TRIES = 1000


@dataclass(frozen=True)
class Blob:
    """A filled shape: `x`, `y` are its top-left pixel, `width` x `height` its bounding box."""

    shape: str
    colour: str
    x: int
    y: int
    width: int
    height: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2

    @property
    def area(self) -> int:
        return int(self.mask().sum())

    def mask(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """Boolean (size, size) mask; circles are the ellipse inscribed in the box, squares and bars fill it."""
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        if self.shape == "circle":
            cx, cy = self.centre
            return ((cols - cx) / (self.width / 2)) ** 2 + ((rows - cy) / (self.height / 2)) ** 2 <= 1.0
        return (cols >= self.x) & (cols < self.x + self.width) & (rows >= self.y) & (rows < self.y + self.height)

    def clear_of(self, other: Blob, gap: int) -> bool:
        """Bounding boxes at least `gap` pixels apart, so counts and colours are never ambiguous."""
        return (
            self.x >= other.x + other.width + gap
            or other.x >= self.x + self.width + gap
            or self.y >= other.y + other.height + gap
            or other.y >= self.y + self.height + gap
        )


@dataclass(frozen=True)
class Scene:
    """A rendered image and everything that determined it, so a question can be answered from the attributes."""

    image: Image.Image
    blobs: tuple[Blob, ...]
    background: int
    noise: float
    frame: str | None = None


def random_background(rng: np.random.Generator) -> tuple[int, float]:
    """A dark grey level and a pixel-noise standard deviation: nuisance factors no answer depends on."""
    return int(rng.integers(0, 50)), float(rng.uniform(2.0, 14.0))


def random_colour(rng: np.random.Generator, exclude: Sequence[str] = ()) -> str:
    """A palette colour other than those in `exclude`."""
    choices = [c for c in COLOURS if c not in exclude]
    return choices[int(rng.integers(len(choices)))]


def blank(background: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """A float (size, size, 3) canvas of one grey level."""
    return np.full((size, size, 3), float(background))


def paint(canvas: np.ndarray, alpha: np.ndarray, colour: str) -> None:
    """Blend `colour` into `canvas` in place with per-pixel opacity `alpha` (bool masks or [0, 1] floats)."""
    weight = np.asarray(alpha, dtype=float)[..., None]
    canvas *= 1.0 - weight
    canvas += weight * np.asarray(PALETTE[colour], dtype=float)


def finish(canvas: np.ndarray, noise: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian pixel noise and quantise to an RGB image."""
    noisy = canvas + rng.normal(0.0, noise, canvas.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def render_scene(
    blobs: Sequence[Blob],
    rng: np.random.Generator,
    frame: str | None = None,
    frame_width: int = 3,
    size: int = IMAGE_SIZE,
) -> Scene:
    """Draw `blobs` in order (later ones on top) over a random background, inside an optional coloured frame."""
    background, noise = random_background(rng)
    canvas = blank(background, size)
    if frame is not None:
        border = np.ones((size, size), dtype=bool)
        border[frame_width:-frame_width, frame_width:-frame_width] = False
        paint(canvas, border, frame)
    for blob in blobs:
        paint(canvas, blob.mask(size), blob.colour)
    return Scene(finish(canvas, noise, rng), tuple(blobs), background, noise, frame)


def place_blob(
    rng: np.random.Generator,
    colour: str,
    width: int,
    height: int | None = None,
    shape: str | None = None,
    centre_x: tuple[float, float] | None = None,
    centre_y: tuple[float, float] | None = None,
    avoid: Sequence[Blob] = (),
    gap: int = 2,
    margin: int = 0,
    size: int = IMAGE_SIZE,
) -> Blob:
    """A blob at a uniform random position whose centre lies in the given closed ranges, clear of `avoid`.

    `margin` keeps the blob that many pixels from the image border (inside a frame, for instance). Raises
    `RuntimeError` when the constraints leave no room, which the task generators never ask for.
    """
    height = width if height is None else height
    shape = SHAPES[int(rng.integers(len(SHAPES)))] if shape is None else shape
    xs = _positions(width, centre_x, margin, size)
    ys = _positions(height, centre_y, margin, size)
    if xs.size and ys.size:
        for _ in range(_MAX_TRIES):
            blob = Blob(shape, colour, int(rng.choice(xs)), int(rng.choice(ys)), width, height)
            if all(blob.clear_of(other, gap) for other in avoid):
                return blob
    raise RuntimeError(f"no room for a {width}x{height} blob (centre x {centre_x}, y {centre_y}) among {len(avoid)}")


def _positions(extent: int, centre: tuple[float, float] | None, margin: int, size: int) -> np.ndarray:
    """Top-left coordinates that keep the blob inside the margins with its centre in `centre`."""
    starts = np.arange(margin, size - margin - extent + 1)
    if centre is not None:
        middles = starts + extent / 2
        starts = starts[(middles >= centre[0]) & (middles <= centre[1])]
    return starts
