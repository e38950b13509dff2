"""Reading generated shapes back: which colour and shape a sample shows, and where.

A simple detector, no model. Every pixel takes the nearest colour of the shapes palette
(:data:`peft_hcp.train.data.COLOURS`, Euclidean distance in RGB). The background is the commonest colour
on the image border; every other pixel is foreground. The shape is the largest 4-connected region of the
foreground, if it covers at least :data:`MIN_SHAPE_AREA` of the image and at least
:data:`MIN_SHAPE_SHARE` of the foreground (one shape, not scattered noise). Its colour is the palette
colour nearest to the mean colour of its inside (the region less its outline, where a sample blends into
the background), if within :data:`COLOUR_TOLERANCE` of it: a colour off the palette is no colour. Its
kind comes from its bounding box, which must be about as high as wide (at most :data:`MAX_ASPECT`, so a
stripe is no shape): a triangle (drawn apex up) has a quarter of its area in the upper half of the box
(less than :data:`TRIANGLE_TOP_SHARE`), a square fills the box (at least :data:`SQUARE_FILL`), a circle
fills pi/4 of it (at least :data:`CIRCLE_FILL`).

The scores built on it, each a fraction of samples, one prompt per sample:

- :func:`colour_score`: the shape has the colour the prompt names (its first palette word);
- :func:`shape_score`: the shape is the kind the prompt names;
- :func:`concept_score`: both, the colour **and** the kind: what a sample of a concept prompt must show;
- :func:`leak_rate`: of samples whose prompt names another colour than a concept colour, those drawn in
  the concept colour: how far a concept spills over prompts that do not ask for it;
- :func:`control_iou`: the mean overlap (intersection over union) of each sample's foreground with the
  foreground of the image its condition was made from: how well samples follow a condition image.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from peft_hcp.train.data import COLOURS, SHAPES


#: The least part of the image a shape must cover to count as one.
MIN_SHAPE_AREA = 0.02
#: The least part of the foreground the shape's region must hold: one shape, not scattered specks.
MIN_SHAPE_SHARE = 0.5
#: The farthest (Euclidean RGB distance) the mean colour of a shape may be from the palette colour it reads as.
COLOUR_TOLERANCE = 80.0
#: The most a shape's bounding box may be longer than wide (the generated shapes have square boxes).
MAX_ASPECT = 1.5
#: A region with less of its area than this in the upper half of its box is a triangle (apex up: 1/4).
TRIANGLE_TOP_SHARE = 0.38
#: Bounding-box fill ratios of the other kinds: a square fills its box, a circle pi/4 (0.79) of it.
SQUARE_FILL, CIRCLE_FILL = 0.84, 0.55

PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)

ImageLike = Union[Image.Image, np.ndarray]


@dataclass
class ShapeReading:
    """What :func:`read_shape` sees in one image."""

    background: str
    colour: Optional[str]  # None: no shape, or one whose colour is off the palette
    shape: Optional[str]  # None: no shape, or a region of no kind (too long, too sparse)
    mask: np.ndarray  # (H, W) bool: the foreground, every pixel not of the background colour


def _pixels(image: ImageLike) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


def palette_labels(image: ImageLike) -> np.ndarray:
    """(H, W) index into :data:`PALETTE_NAMES` of each pixel's nearest palette colour."""
    distances = ((_pixels(image)[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (all False if ``mask`` is)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, region = deque([start]), []
        while queue:
            row, col = queue.popleft()
            region.append((row, col))
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    queue.append((r, c))
        if len(region) > len(best):
            best = region
    largest = np.zeros_like(mask, dtype=bool)
    if best:
        rows, cols = zip(*best)
        largest[list(rows), list(cols)] = True
    return largest


def _inside(region: np.ndarray) -> np.ndarray:
    """``region`` less its outline (pixels with a 4-neighbour outside it), or all of it if nothing is left."""
    padded = np.pad(region, 1)
    inside = region & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside if inside.any() else region


def shape_colour(pixels: np.ndarray, region: np.ndarray) -> Optional[str]:
    """The palette colour within :data:`COLOUR_TOLERANCE` of the mean colour inside ``region``, or ``None``."""
    distances = np.sqrt(((_PALETTE - pixels[_inside(region)].mean(0)) ** 2).sum(-1))
    nearest = int(distances.argmin())
    return PALETTE_NAMES[nearest] if distances[nearest] <= COLOUR_TOLERANCE else None


def shape_kind(region: np.ndarray) -> Optional[str]:
    """``"square"``, ``"circle"`` or ``"triangle"`` from the bounding box of ``region``, or ``None``."""
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return None
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    if max(height, width) > MAX_ASPECT * min(height, width):
        return None
    if np.mean(rows + 0.5 < rows.min() + height / 2) < TRIANGLE_TOP_SHARE:
        return "triangle"
    fill = rows.size / (height * width)
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else None


def read_shape(image: ImageLike) -> ShapeReading:
    """The background colour, the shape's colour and kind, and the foreground mask of ``image``."""
    pixels = _pixels(image)
    labels = palette_labels(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = PALETTE_NAMES[int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())]
    mask = labels != PALETTE_NAMES.index(background)
    region = largest_region(mask)
    area = int(region.sum())
    if area < MIN_SHAPE_AREA * labels.size or area < MIN_SHAPE_SHARE * mask.sum():
        return ShapeReading(background, None, None, mask)
    colour = shape_colour(pixels, region)
    return ShapeReading(background, None if colour == background else colour, shape_kind(region), mask)


def named_in(prompt: str, words: Sequence[str]) -> Optional[str]:
    """The first of ``words`` that ``prompt`` says (whole words), or ``None``."""
    said = prompt.lower().replace(",", " ").split()
    return next((word for word in said if word in words), None)


def _readings(images: Sequence[ImageLike], prompts: Sequence[str]) -> list[ShapeReading]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one prompt per image.")
    return [read_shape(image) for image in images]


def _matches(reading: ShapeReading, prompt: str, colour: bool, shape: bool) -> bool:
    wanted_colour, wanted_shape = named_in(prompt, PALETTE_NAMES), named_in(prompt, SHAPES)
    colour_ok = wanted_colour is not None and reading.colour == wanted_colour
    shape_ok = wanted_shape is not None and reading.shape == wanted_shape
    return (colour_ok or not colour) and (shape_ok or not shape)


def _agreement(images: Sequence[ImageLike], prompts: Sequence[str], colour: bool, shape: bool) -> float:
    readings = _readings(images, prompts)
    return float(np.mean([_matches(r, p, colour, shape) for r, p in zip(readings, prompts)]))


def colour_score(images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """Fraction of ``images`` whose shape has the colour its prompt names (one prompt per image)."""
    return _agreement(images, prompts, colour=True, shape=False)


def shape_score(images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """Fraction of ``images`` whose shape is the kind its prompt names (one prompt per image)."""
    return _agreement(images, prompts, colour=False, shape=True)


def concept_score(images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """Fraction of ``images`` whose shape has both the colour and the kind its prompt names."""
    return _agreement(images, prompts, colour=True, shape=True)


def leak_rate(images: Sequence[ImageLike], prompts: Sequence[str], colour: str) -> float:
    """Of the ``images`` whose prompt names a colour other than ``colour``, the fraction drawn in ``colour``."""
    readings = _readings(images, prompts)
    others = [r for r, p in zip(readings, prompts) if named_in(p, PALETTE_NAMES) not in (None, colour)]
    if not others:
        raise ValueError(f"No prompt names a colour other than {colour!r}: there is no leak to measure.")
    return float(np.mean([r.colour == colour for r in others]))


def mask_iou(image: ImageLike, reference: ImageLike) -> float:
    """Intersection over union of the foregrounds of ``image`` and ``reference`` (1.0 if both are empty)."""
    a, b = read_shape(image).mask, read_shape(reference).mask
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def control_iou(images: Sequence[ImageLike], references: Sequence[ImageLike]) -> float:
    """Mean :func:`mask_iou` of each image with its reference."""
    if len(images) != len(references):
        raise ValueError(f"{len(images)} images for {len(references)} references; give one reference per image.")
    return float(np.mean([mask_iou(image, reference) for image, reference in zip(images, references)]))


@dataclass(frozen=True)
class BeforeAfter:
    """A score of the samples with the adapters off (the base) and on; prints as the line a run logs."""

    name: str
    before: float
    after: float

    def __str__(self) -> str:
        return f"{self.name}: before {self.before:.3f} after {self.after:.3f}"
