"""A tiny ``StableDiffusionPipeline`` built locally (tiny UNet, CLIP text encoder, VAE, tokenizer)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from peft_hcp.embedded.models import tiny_clip_text_model, tiny_unet

PROMPT = "a cat"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (a 2-step run: 13 s -> 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer(folder: str) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a few hundred byte-level symbols, written to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(folder, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!", model_max_length=77
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def tiny_pipeline(folder: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(),
        tokenizer=tiny_tokenizer(os.path.join(folder, "tokenizer")),
        unet=tiny_unet(),
        scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_out(pipe, steps: int = 2) -> torch.Tensor:
    """Latents of a two-step generation from a fixed seed."""
    with torch.no_grad():
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            height=16,
            width=16,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
