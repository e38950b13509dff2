"""A tiny SDXL pipeline, built locally from configs, for the interchange tests (latents, not images)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from peft_hcp.embedded import tiny_vae, tokenizer_path
from peft_hcp.embedded.models import SDXL_TEXT_EMBEDS, tiny_clip_text_config, tiny_sdxl_unet


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's layout at toy size: two CLIP encoders (32 + 32 = the UNet's 64 cross-attention features)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(32, projection_dim=SDXL_TEXT_EMBEDS)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(32, projection_dim=SDXL_TEXT_EMBEDS)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path())
    vae: AutoencoderKL = tiny_vae(seed)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_latents(pipe: StableDiffusionXLPipeline, steps: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=steps,
            height=32,
            width=32,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
