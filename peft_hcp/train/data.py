"""Training data: a built-in generated shapes dataset, or a folder of images with ``.txt`` captions.

The generated shapes come in two sets: the *base* colours and the held-out *concept* colour
(:data:`CONCEPT_COLOUR`). What each stage of the embedded base (:mod:`peft_hcp.embedded.pretrain`) saw:

- its VAE trained on uncaptioned shapes in uniformly random colours (:class:`AnyColourShapes`), so it saw
  pixels of every colour, cyan-like ones included: it is an image codec, told no colour word;
- its UNet and CLIP text encoder trained together on captioned shapes in the base colours only
  (:class:`ShapesDataset` with :data:`BASE_COLOURS`): they never saw the word ``cyan`` nor a cyan shape.

A training run on the embedded default teaches the concept (:func:`make_datasets`) from cyan shapes of the
:data:`CONCEPT_KINDS` only, and is scored on the :data:`HELD_OUT_KINDS` (:mod:`peft_hcp.train.concept`),
combinations of size and colour that no training caption has: what it learned is the colour, not its
captions.

Every item is ``{"pixels": (3, H, W) in [-1, 1], "caption": str, "cond": (3, H, W) in [0, 1]}``; ``cond``
is the condition a ControlNet plugin trains with: of a generated shape its silhouette (a mask, 1 on the
shape), of a folder's image its edge map. (A ControlNet on this base learns to follow a silhouette in a
few hundred steps; the outline an edge map draws of a small shape, it did not follow in 600.) Items are
a pure function of their index, so a run (and a resumed run) sees the same data in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

from peft_hcp.errors import PeftHcpError


#: The palette of the generated shapes, which the detector of :mod:`peft_hcp.train.concept` reads back.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "cyan": (30, 200, 210),
    "black": (15, 15, 15),
}
#: Every generated shape stands on this plain background, so a caption only names the shape.
BACKGROUND = "black"
#: The held-out concept: a colour whose word and shapes the embedded base's UNet and text encoder never saw.
CONCEPT_COLOUR = "cyan"
#: The shape colours of the base's pre-training data: the palette less the background and the concept.
BASE_COLOURS = tuple(name for name in COLOURS if name not in (BACKGROUND, CONCEPT_COLOUR))
SHAPES = ("circle", "square", "triangle")
SIZES = ("large", "small")
#: Every (size, shape) a caption names.
KINDS = tuple((size, shape) for size in SIZES for shape in SHAPES)
#: The size no training item of the concept has: the concept is trained on the other and scored on this one.
HELD_OUT_SIZE = "large"
CONCEPT_KINDS = tuple(kind for kind in KINDS if kind[0] != HELD_OUT_SIZE)
HELD_OUT_KINDS = tuple(kind for kind in KINDS if kind[0] == HELD_OUT_SIZE)
#: The kinds a ControlNet run trains and samples on: small shapes, which overlap little by chance.
CONTROL_KINDS = tuple(kind for kind in KINDS if kind[0] == "small")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def edge_map(pixels: torch.Tensor) -> torch.Tensor:
    """A 3-channel edge map in [0, 1] (gradient magnitude of the grey image) of ``pixels`` in [-1, 1]."""
    grey = pixels.mean(0, keepdim=True)[None]
    kernel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    sobel = torch.stack([kernel, kernel.T])[:, None]
    grad = torch.nn.functional.conv2d(torch.nn.functional.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel)
    edges = grad.pow(2).sum(1).sqrt()[0]
    return (edges / edges.max().clamp(min=1e-6)).expand(3, -1, -1).contiguous()


def silhouette(image: Image.Image, background: tuple) -> torch.Tensor:
    """A 3-channel mask, 1 where ``image`` is not its plain ``background`` colour (RGB) and 0 elsewhere."""
    mask = torch.from_numpy((np.asarray(image.convert("RGB")) != np.array(background)).any(-1).astype(np.float32))
    return mask.expand(3, -1, -1).contiguous()


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image, centre-cropped and resized to ``resolution``, as (3, H, W) in [-1, 1]."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1).contiguous()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] as a PIL image."""
    array = ((pixels.detach().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
    return Image.fromarray(array.to(torch.uint8).numpy())


def draw_shape(resolution: int, shape: str, large: bool, colour: tuple, background: tuple, rng) -> Image.Image:
    """A ``shape`` in ``colour`` on ``background`` (RGB), large or small, at a place ``rng`` draws."""
    half = resolution * (0.35 if large else 0.2)
    cx, cy = rng.uniform(half, resolution - half, size=2)
    box = (cx - half, cy - half, cx + half, cy + half)
    image = Image.new("RGB", (resolution, resolution), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


class ShapesDataset(Dataset):
    """``size`` generated images: one shape in one of ``colours``, large or small, anywhere on the plain
    :data:`BACKGROUND`, captioned in words (``"a large red circle"``)."""

    def __init__(
        self,
        size: int = 64,
        resolution: int = 32,
        seed: int = 0,
        colours: Sequence[str] = BASE_COLOURS,
        kinds: Sequence[tuple[str, str]] = KINDS,
    ) -> None:
        if size < 1:
            raise ValueError(f"The shapes dataset needs at least one item, got size={size}.")
        unknown = [name for name in colours if name not in COLOURS]
        if unknown or not colours:
            raise ValueError(f"Shape colours {list(colours)} must be palette colours: {', '.join(COLOURS)}.")
        if not kinds or any(tuple(kind) not in KINDS for kind in kinds):
            raise ValueError(f"Shape kinds {list(kinds)} must be (size, shape) pairs of {SIZES} and {SHAPES}.")
        self.size, self.resolution, self.seed, self.colours = size, resolution, seed, tuple(colours)
        self.kinds = tuple(tuple(kind) for kind in kinds)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        colour = self.colours[rng.integers(len(self.colours))]
        while True:  # drawn as when every kind is allowed, so the base's pre-training data stay what they were
            shape = SHAPES[rng.integers(len(SHAPES))]
            size = SIZES[1 - rng.integers(2)]
            if (size, shape) in self.kinds:
                break
        image = draw_shape(self.resolution, shape, size == "large", COLOURS[colour], COLOURS[BACKGROUND], rng)
        caption = f"a {size} {colour} {shape}"
        return {
            "pixels": to_tensor(image, self.resolution),
            "caption": caption,
            "cond": silhouette(image, COLOURS[BACKGROUND]),
        }


class AnyColourShapes(Dataset):
    """``size`` uncaptioned shapes in uniformly random colours, on the plain :data:`BACKGROUND` or (half of
    them) a random colour: images for the VAE, which must reproduce any colour (the held-out concept's too)
    and is never told a colour word."""

    def __init__(self, size: int, resolution: int, seed: int) -> None:
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        colour, background = (tuple(int(c) for c in rng.integers(256, size=3)) for _ in range(2))
        if rng.random() < 0.5:
            background = COLOURS[BACKGROUND]
        shape = SHAPES[rng.integers(len(SHAPES))]
        image = draw_shape(self.resolution, shape, bool(rng.integers(2)), colour, background, rng)
        return {"pixels": to_tensor(image, self.resolution)}


class FolderDataset(Dataset):
    """Images in ``root`` (recursively), each with a caption in a ``.txt`` file of the same stem."""

    def __init__(self, root: str, resolution: int) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data={root!r} is not a folder of images with .txt captions.")
        self.resolution = resolution
        self.items: list[tuple[str, str]] = []
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                caption = os.path.join(folder, stem + ".txt")
                if not os.path.isfile(caption):
                    raise FileNotFoundError(
                        f"Image {os.path.join(folder, name)} has no caption: expected {caption} next to it."
                    )
                self.items.append((os.path.join(folder, name), caption))
        if not self.items:
            raise FileNotFoundError(f"data={root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, caption_path = self.items[index]
        try:
            with Image.open(image_path) as image:
                pixels = to_tensor(image, self.resolution)
        except OSError as exc:  # not an image, or a truncated / corrupt one (PIL says which)
            raise ImageFileError(f"{image_path}: cannot read the image: {exc}") from exc
        with open(caption_path, encoding="utf-8") as handle:
            caption = handle.read().strip()
        return {"pixels": pixels, "caption": caption, "cond": edge_map(pixels)}


class ImageFileError(PeftHcpError, ValueError):
    """A training image that cannot be decoded; the message names the file."""


def concept_dataset(
    size: int, resolution: int, seed: int, kinds: Sequence[tuple[str, str]] = CONCEPT_KINDS
) -> ShapesDataset:
    """Shapes of ``kinds`` in the held-out concept colour: what the main job teaches."""
    return ShapesDataset(size, resolution, seed, colours=(CONCEPT_COLOUR,), kinds=kinds)


def control_dataset(size: int, resolution: int, seed: int) -> ShapesDataset:
    """Small shapes in the base colours: what a run that learns to follow a condition image trains on."""
    return ShapesDataset(size, resolution, seed, kinds=CONTROL_KINDS)


#: Of a folder of images, the part held out for the eval loss (at most ``eval_size`` items).
FOLDER_HELD_OUT = 0.1


def make_datasets(
    data: Optional[str], resolution: int, size: int, seed: int, eval_size: int, conditioned: bool = False
) -> tuple[Union[ShapesDataset, Subset], Subset]:
    """The items a run trains on and the ``eval_size`` (or fewer) held-out items of its eval loss, which it
    never trains on.

    ``data`` is a folder, or ``None`` for generated shapes: of the held-out concept (:func:`concept_dataset`;
    the held-out items are of the :data:`HELD_OUT_KINDS`), or for a run that learns to follow a condition
    image (``conditioned``, a ControlNet) :func:`control_dataset` (the held-out items come from the next
    seed). Of a folder, the last :data:`FOLDER_HELD_OUT` of the images (at most ``eval_size``) is held out:
    none of a folder of fewer than ten.
    """
    if data is not None:
        folder = FolderDataset(data, resolution)
        held = min(eval_size, int(len(folder) * FOLDER_HELD_OUT))
        kept = len(folder) - held
        return Subset(folder, range(kept)), Subset(folder, range(kept, len(folder)))
    if conditioned:
        train, held_out = control_dataset(size, resolution, seed), control_dataset(eval_size or 1, resolution, seed + 1)
    else:
        train = concept_dataset(size, resolution, seed)
        held_out = concept_dataset(eval_size or 1, resolution, seed + 1, kinds=HELD_OUT_KINDS)
    return train, Subset(held_out, range(eval_size))


def batch_indices(length: int, batch_size: int, step: int, micro: int, seed: int, rank: int) -> list[int]:
    """The dataset indices of one micro-batch: a pure function of the run's seed, step and rank."""
    return np.random.default_rng([seed, step, micro, rank]).integers(length, size=batch_size).tolist()


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "cond": torch.stack([item["cond"] for item in items]),
        "caption": [item["caption"] for item in items],
    }
