"""Training data: a built-in generated shapes dataset, or a folder of images with ``.txt`` captions.

Every item is ``{"pixels": (3, H, W) in [-1, 1], "caption": str, "cond": (3, H, W) in [0, 1]}``; ``cond``
is an edge map of the image, the condition a ControlNet plugin trains with. Items are a pure function
of their index, so a run (and a resumed run) sees the same data in the same order.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def edge_map(pixels: torch.Tensor) -> torch.Tensor:
    """A 3-channel edge map in [0, 1] (gradient magnitude of the grey image) of ``pixels`` in [-1, 1]."""
    grey = pixels.mean(0, keepdim=True)[None]
    kernel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    sobel = torch.stack([kernel, kernel.T])[:, None]
    grad = torch.nn.functional.conv2d(torch.nn.functional.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel)
    edges = grad.pow(2).sum(1).sqrt()[0]
    return (edges / edges.max().clamp(min=1e-6)).expand(3, -1, -1).contiguous()


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image, centre-cropped and resized to ``resolution``, as (3, H, W) in [-1, 1]."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1).contiguous()


class ShapesDataset:
    """``size`` generated images: one coloured shape on a plain background, captioned in words."""

    def __init__(self, size: int = 64, resolution: int = 32, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"The shapes dataset needs at least one item, got size={size}.")
        self.size, self.resolution, self.seed = size, resolution, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        names = list(COLOURS)
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[rng.integers(len(SHAPES))]
        large = bool(rng.integers(2))
        res = self.resolution
        half = res * (0.35 if large else 0.2)
        cx, cy = rng.uniform(half, res - half, size=2)
        box = (cx - half, cy - half, cx + half, cy + half)
        image = Image.new("RGB", (res, res), COLOURS[names[bg]])
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[names[fg]])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[names[fg]])
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLOURS[names[fg]])
        pixels = to_tensor(image, res)
        size_word = "large" if large else "small"
        caption = f"a {size_word} {names[fg]} {shape} on a {names[bg]} background"
        return {"pixels": pixels, "caption": caption, "cond": edge_map(pixels)}


class FolderDataset:
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


class ImageFileError(ValueError):
    """A training image that cannot be decoded; the message names the file."""


def make_dataset(data: Optional[str], resolution: int, size: int, seed: int):
    """``data`` (a folder) or, when ``None``, the generated shapes."""
    return ShapesDataset(size, resolution, seed) if data is None else FolderDataset(data, resolution)


def batch_indices(length: int, batch_size: int, step: int, micro: int, seed: int, rank: int) -> list[int]:
    """The dataset indices of one micro-batch: a pure function of the run's seed, step and rank."""
    return np.random.default_rng([seed, step, micro, rank]).integers(length, size=batch_size).tolist()


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "cond": torch.stack([item["cond"] for item in items]),
        "caption": [item["caption"] for item in items],
    }
