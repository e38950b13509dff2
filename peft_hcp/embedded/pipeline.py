"""The pipeline a run trains: the embedded tiny default, or a local diffusers Stable Diffusion folder.

The embedded default is a Stable-Diffusion-shaped pipeline built from small configs (tiny UNet and CLIP
text encoder from :mod:`peft_hcp.embedded.models`, the CLIP BPE tokenizer shipped in
``peft_hcp/embedded/assets/tokenizer``, a two-level ``AutoencoderKL``, a DDPM scheduler) with the weights
shipped in ``peft_hcp/embedded/assets/base.safetensors``: pre-trained on the generated shapes by
:mod:`peft_hcp.embedded.pretrain`, so its samples show the prompted shape and colour. Every process loads
the same weights, so an adapter trained on it loads onto a rebuilt one.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from peft_hcp.base.components import pipeline_components
from peft_hcp.base.files import read_safetensors
from peft_hcp.base.fit import check_state_dict
from peft_hcp.embedded.models import tiny_clip_text_model, tiny_unet, tiny_vae
from peft_hcp.errors import CheckpointError


#: The pipeline components whose weights the base file holds, each under its name as a key prefix.
BASE_COMPONENTS = ("vae", "text_encoder", "unet")
#: Key of the base file's metadata holding the VAE's latent scaling factor.
SCALING_FACTOR_KEY = "vae_scaling_factor"


def tokenizer_path() -> str:
    """Folder of the tiny CLIP tokenizer (vocab.json, merges.txt) that ships with the package."""
    return str(resources.files("peft_hcp.embedded") / "assets" / "tokenizer")


def base_weights_path() -> str:
    """The shipped weights of the embedded base (written by ``peft-hcp pretrain-base``)."""
    return str(resources.files("peft_hcp.embedded") / "assets" / "base.safetensors")


def untrained_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline with the random weights its configs give for ``seed``: what pre-training starts from."""
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


def save_base_weights(pipe: StableDiffusionPipeline, path: str, dtype: torch.dtype = torch.float16) -> None:
    """Write the base components' weights (as ``dtype``) and the VAE scaling factor to one safetensors file."""
    tensors = {
        f"{name}.{key}": value.detach().to(dtype).contiguous()
        for name, model in pipeline_components(pipe, BASE_COMPONENTS).items()
        for key, value in model.state_dict().items()
    }
    save_file(tensors, path, metadata={SCALING_FACTOR_KEY: repr(float(pipe.vae.config.scaling_factor))})


def load_base_weights(pipe: StableDiffusionPipeline, path: str) -> None:
    """Load a file of :func:`save_base_weights` into ``pipe``: every weight, nothing else, each of its shape.

    The whole file is checked before any weight is copied, so a file that does not fit leaves ``pipe`` as it was.
    """
    tensors = read_safetensors(path)
    with safe_open(path, "pt") as handle:
        scaling_factor = (handle.metadata() or {}).get(SCALING_FACTOR_KEY)
    if scaling_factor is None:
        raise CheckpointError(f"{path} has no {SCALING_FACTOR_KEY!r} in its metadata; it is not a base weights file.")
    states = {}
    components = pipeline_components(pipe, BASE_COMPONENTS)
    for name, model in components.items():
        prefix = f"{name}."
        states[name] = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        check_state_dict(states[name], model.state_dict(), path, f"the pipeline's {name}")
    for name, state in states.items():
        components[name].load_state_dict(state, strict=True)
    pipe.vae.register_to_config(scaling_factor=float(scaling_factor))


def embedded_pipeline() -> StableDiffusionPipeline:
    """The tiny default pipeline with the shipped pre-trained weights, built locally (no download)."""
    path = base_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The embedded base weights {path} are missing; `peft-hcp pretrain-base` writes them.")
    pipe = untrained_pipeline()
    load_base_weights(pipe, path)
    return pipe


def load_pipeline(pretrained_model: Optional[str] = None) -> StableDiffusionPipeline:
    """``pretrained_model`` (a local diffusers folder) or, when ``None``, the embedded default.

    Only local folders are read: a name that is not a folder is an error, nothing is downloaded.
    """
    if pretrained_model is None:
        return embedded_pipeline()
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
