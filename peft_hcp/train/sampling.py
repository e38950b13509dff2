"""Sample grids: fixed prompts and seeds rendered with the adapters off and on, side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw

from peft_hcp.base.blocks import WeightedBlock
from peft_hcp.base.feed import feed


@contextlib.contextmanager
def adapters_disabled(pipe) -> Iterator[None]:
    """diffusers' ``pipe.disable_lora()`` for the block (every adapter kind: they are all PEFT tuner layers)."""
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


def needs_condition(pipe) -> bool:
    """Whether a plugin on the pipeline takes a condition image through the feeder."""
    return any(isinstance(m, WeightedBlock) and "cond" in m.input_keys for m in pipe.unet.modules())


@torch.no_grad()
def render(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float = 1.0,
    cond: Optional[torch.Tensor] = None,
    resolution: Optional[int] = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major; ``cond`` is (len(prompts), 3, H, W) in [0, 1]."""
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    images = []
    try:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                feeding = feed(pipe, cond=cond[index : index + 1]) if cond is not None else contextlib.nullcontext()
                with feeding:
                    out = pipe(
                        prompt,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        height=resolution,
                        width=resolution,
                        generator=torch.Generator().manual_seed(int(seed)),
                        output_type="pil",
                    )
                images.append(out.images[0])
    finally:
        pipe.scheduler = scheduler
    return images


def grid(off: list[Image.Image], on: list[Image.Image], columns: int, title: str = "") -> Image.Image:
    """Rows of ``columns`` images: the adapter-off images on the left half, adapter-on on the right."""
    width, height = off[0].size
    rows = len(off) // columns
    header = 14
    sheet = Image.new("RGB", (2 * columns * width + 4, rows * height + header), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), f"off | on  {title}", fill=(0, 0, 0))
    for index, (a, b) in enumerate(zip(off, on)):
        row, col = divmod(index, columns)
        sheet.paste(a, (col * width, header + row * height))
        sheet.paste(b, ((columns + col) * width + 4, header + row * height))
    return sheet


def sample_grid(pipe, prompts, seeds, steps, guidance_scale=1.0, cond=None, resolution=None, title="") -> Image.Image:
    """The off/on comparison grid for ``prompts`` x ``seeds``."""
    args = (pipe, prompts, seeds, steps, guidance_scale, cond, resolution)
    with adapters_disabled(pipe):
        off = render(*args)
    on = render(*args)
    return grid(off, on, len(seeds), title)
