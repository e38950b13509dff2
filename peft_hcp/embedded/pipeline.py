"""The pipeline a run trains: the embedded tiny default, or a local diffusers Stable Diffusion folder.

The embedded default is a Stable-Diffusion-shaped pipeline built from small configs with fixed seeds
(tiny UNet and CLIP text encoder from :mod:`peft_hcp.embedded.models`, the CLIP BPE tokenizer shipped in
``peft_hcp/embedded/assets/tokenizer``, a two-level ``AutoencoderKL``, a DDPM scheduler). Its random weights are
the same in every process, so an adapter trained on it loads onto a rebuilt one.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from peft_hcp.embedded.models import (
    tiny_clip_text_model,
    tiny_unet,
    tiny_vae,
)


def tokenizer_path() -> str:
    """Folder of the tiny CLIP tokenizer (vocab.json, merges.txt) that ships with the package."""
    return str(resources.files("peft_hcp.embedded") / "assets" / "tokenizer")


def embedded_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny default pipeline, built locally (no download)."""
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(seed),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_path()),
        unet=tiny_unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(pretrained_model: Optional[str] = None, seed: int = 0) -> StableDiffusionPipeline:
    """``pretrained_model`` (a local diffusers folder) or, when ``None``, the embedded default.

    Only local folders are read: a name that is not a folder is an error, nothing is downloaded.
    """
    if pretrained_model is None:
        return embedded_pipeline(seed)
    if not os.path.isdir(pretrained_model):
        raise FileNotFoundError(
            f"pretrained_model={pretrained_model!r} is not a folder; give a local diffusers Stable Diffusion "
            "checkout (with unet/, text_encoder/, tokenizer/, vae/, scheduler/) or leave it unset for the "
            "embedded default."
        )
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(pretrained_model, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(pretrained_model, subfolder="text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(pretrained_model, subfolder="tokenizer", local_files_only=True),
        unet=UNet2DConditionModel.from_pretrained(pretrained_model, subfolder="unet", local_files_only=True),
        scheduler=DDPMScheduler.from_pretrained(pretrained_model, subfolder="scheduler", local_files_only=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def default_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image size the pipeline's UNet was built for."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
