"""Models built locally from configs (no downloads): the embedded defaults of demos, tests, benchmarks."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TINY_CROSS_DIM = 32
#: Image size of the embedded default: the tiny VAE halves it to the tiny UNet's 16x16 latents.
EMBEDDED_RESOLUTION = 32


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A two-level Stable-Diffusion-shaped UNet (~0.5M parameters) with cross-attention, in fp32."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """A UNet with the Stable Diffusion 1.5 layout and random weights (~860M parameters)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ).eval()


def tiny_clip_text_model(seed: int = 0) -> CLIPTextModel:
    """A two-layer CLIP text encoder whose hidden size matches :func:`tiny_unet`'s cross-attention."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=TINY_CROSS_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-level ``AutoencoderKL`` (factor 2, 4 latent channels) matching :func:`tiny_unet`."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=EMBEDDED_RESOLUTION,
    ).eval()


def unet_inputs(batch: int = 2, size: int = 16, seed: int = 0, cross_dim: int = TINY_CROSS_DIM):
    """Fixed (sample, timestep, encoder_hidden_states) for a UNet forward."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    timestep = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    text = torch.randn(batch, 7, cross_dim, generator=generator)
    return sample, timestep, text
