"""Reading generated shapes back: which colour and shape a sample shows, and where.

A simple detector, no model. Every pixel takes the nearest colour of the shapes palette
(:data:`peft_hcp.train.data.COLOURS`, Euclidean distance in RGB). The background is the commonest colour
on the image border; the shape is the commonest other colour, if it covers at least
:data:`MIN_SHAPE_AREA` of the image. Its kind comes from how much of its bounding box it fills (after
dropping specks): a square fills all of it, a circle pi/4, a triangle half.

The scores built on it:

- :func:`concept_score`: the fraction of samples whose shape has the colour their prompt names (the first
  palette word of the prompt). On prompts naming the held-out concept colour, it is the fraction of
  samples that show the concept.
- :func:`shape_score`: the same for the shape word.
- :func:`control_iou`: the mean overlap (intersection over union) of each sample's shape mask (every
  pixel not of the background colour) with the mask of the image its condition was made from: how
  well samples follow a condition image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from peft_hcp.train.data import COLOURS, SHAPES


#: The least part of the image a shape must cover to count as one.
MIN_SHAPE_AREA = 0.02
#: Bounding-box fill ratios between the kinds: square ~1, circle ~0.79, triangle ~0.5.
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.65
#: A mask pixel with fewer set neighbours (of 8) is a speck, left out of the shape's kind.
SPECK_NEIGHBOURS = 2

PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float32)

ImageLike = Union[Image.Image, np.ndarray]


@dataclass
class ShapeReading:
    """What :func:`read_shape` sees in one image."""

    background: str
    colour: Optional[str]  # None: no shape (nothing but the background, or too small)
    shape: Optional[str]
    mask: np.ndarray  # (H, W) bool: pixels not of the background colour


def palette_labels(image: ImageLike) -> np.ndarray:
    """(H, W) index into :data:`PALETTE_NAMES` of each pixel's nearest palette colour."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """``mask`` less the pixels with fewer than :data:`SPECK_NEIGHBOURS` of their 8 neighbours set."""
    padded = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    neighbours = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) - mask
    return mask & (neighbours >= SPECK_NEIGHBOURS)


def shape_kind(mask: np.ndarray) -> Optional[str]:
    """``"square"``, ``"circle"`` or ``"triangle"`` from how much of its bounding box ``mask`` fills."""
    kept = _without_specks(mask)
    if not kept.any():
        return None
    rows, cols = np.nonzero(kept)
    fill = kept.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def read_shape(image: ImageLike) -> ShapeReading:
    """The background colour, the shape's colour and kind, and the shape's mask in ``image``."""
    labels = palette_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())
    mask = labels != background
    counts = np.bincount(labels[mask], minlength=len(PALETTE_NAMES))
    if counts.max(initial=0) < MIN_SHAPE_AREA * labels.size:
        return ShapeReading(PALETTE_NAMES[background], None, None, mask)
    colour = int(counts.argmax())
    return ShapeReading(PALETTE_NAMES[background], PALETTE_NAMES[colour], shape_kind(labels == colour), mask)


def named_in(prompt: str, words: Sequence[str]) -> Optional[str]:
    """The first of ``words`` that ``prompt`` says (whole words), or ``None``."""
    said = prompt.lower().replace(",", " ").split()
    return next((word for word in said if word in words), None)


def _agreement(images: Sequence[ImageLike], prompts: Sequence[str], words: Sequence[str], field: str) -> float:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one prompt per image.")
    named = [named_in(prompt, words) for prompt in prompts]
    return float(np.mean([n is not None and getattr(read_shape(i), field) == n for i, n in zip(images, named)]))


def concept_score(images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """Fraction of ``images`` whose shape has the colour its prompt names (one prompt per image)."""
    return _agreement(images, prompts, PALETTE_NAMES, "colour")


def shape_score(images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """Fraction of ``images`` whose shape is the kind its prompt names (one prompt per image)."""
    return _agreement(images, prompts, SHAPES, "shape")


def mask_iou(image: ImageLike, reference: ImageLike) -> float:
    """Intersection over union of the shape masks of ``image`` and ``reference`` (1.0 if both are empty)."""
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
