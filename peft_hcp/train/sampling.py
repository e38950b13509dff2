"""Sample grids: fixed prompts and seeds rendered with the adapters off and on, side by side, labelled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw, ImageFont

from peft_hcp.base.feed import fed_plugins, feed


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
    return any("cond" in block.input_keys for block in fed_plugins(pipe))


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
    """One image per (prompt, seed), prompt-major, in one batched call; ``cond`` is (len(prompts), 3, H, W)
    in [0, 1]. Each image starts from the noise of its own seed, so it is the image a single call gives."""
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    batch = [prompt for prompt in prompts for _ in seeds]
    generators = [torch.Generator().manual_seed(int(seed)) for _ in prompts for seed in seeds]
    feeding = feed(pipe, cond=cond.repeat_interleave(len(seeds), 0)) if cond is not None else contextlib.nullcontext()
    try:
        with feeding:
            out = pipe(
                batch,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pil",
            )
    finally:
        pipe.scheduler = scheduler
    return out.images


def render_off_on(pipe, *args, **kwargs) -> tuple[list[Image.Image], list[Image.Image]]:
    """:func:`render` with the adapters off, then on."""
    with adapters_disabled(pipe):
        off = render(pipe, *args, **kwargs)
    on = render(pipe, *args, **kwargs)
    return off, on


#: Height of a text line in a grid, the gap between its halves, and the text size.
LINE, GAP, FONT_SIZE = 16, 6, 12


def grid(
    off: Sequence[Image.Image],
    on: Sequence[Image.Image],
    prompts: Sequence[str],
    title: str = "",
    conditions: Optional[Sequence[Image.Image]] = None,
    scale: int = 2,
) -> Image.Image:
    """One row per prompt, its text above it: the adapter-off images on the left half, adapter-on on the right.

    Images are enlarged ``scale`` times (nearest neighbour); ``conditions`` (one per prompt) go first in
    their row, ahead of the off half."""
    columns = len(off) // len(prompts)
    width, height = (side * scale for side in off[0].size)
    lead = width + GAP if conditions else 0
    half = columns * width
    sheet = Image.new("RGB", (lead + 2 * half + GAP, 2 * LINE + len(prompts) * (LINE + height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(FONT_SIZE)
    draw.text((2, 1), title, fill="black", font=font)
    if conditions:
        draw.text((2, LINE + 1), "condition", fill="black", font=font)
    draw.text((lead + 2, LINE + 1), "adapters off", fill="black", font=font)
    draw.text((lead + half + GAP + 2, LINE + 1), "adapters on", fill="black", font=font)
    for row, prompt in enumerate(prompts):
        top = 2 * LINE + row * (LINE + height)
        draw.text((2, top + 1), prompt, fill=(60, 60, 60), font=font)
        if conditions:
            sheet.paste(conditions[row].resize((width, height), Image.NEAREST), (0, top + LINE))
        for col in range(columns):
            index = row * columns + col
            sheet.paste(off[index].resize((width, height), Image.NEAREST), (lead + col * width, top + LINE))
            sheet.paste(on[index].resize((width, height), Image.NEAREST), (lead + half + GAP + col * width, top + LINE))
    return sheet
