"""Models built locally from configs (no downloads): the embedded defaults of demos, tests, benchmarks."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel


ModelT = TypeVar("ModelT", bound=torch.nn.Module)

TINY_CROSS_DIM = 32
SDXL_TEXT_EMBEDS = 32  # projection_class_embeddings_input_dim - 6 time ids * addition_time_embed_dim
#: Image size of the embedded default: the tiny VAE halves it to the tiny UNet's 16x16 latents.
EMBEDDED_RESOLUTION = 32


#: the tiny SD-shaped UNet: two levels, cross-attention in the outer one
_TINY_UNET = dict(
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
)


def _built(model_cls: type[ModelT], seed: int, **config) -> ModelT:
    """``model_cls(**config)`` with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return model_cls(**config).eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A two-level Stable-Diffusion-shaped UNet (~0.5M parameters) with cross-attention, in fp32."""
    return _built(UNet2DConditionModel, seed, **_TINY_UNET)


def sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """A UNet with the Stable Diffusion 1.5 layout and random weights (~860M parameters)."""
    return _built(
        UNet2DConditionModel, seed, sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2
    )


def tiny_clip_text_config(hidden_size: int = TINY_CROSS_DIM, **overrides: Any) -> CLIPTextConfig:
    """The config of a two-layer CLIP text encoder for the tiny tokenizer; ``overrides`` (SDXL's second encoder:
    ``projection_dim``) are further config fields."""
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **overrides,
    )


def tiny_clip_text_model(seed: int = 0) -> CLIPTextModel:
    """A two-layer CLIP text encoder whose hidden size matches :func:`tiny_unet`'s cross-attention."""
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_text_config()).eval()


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


def _noise(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SDXL-shaped UNet: ``text_time`` added embedding, linear projections, two transformer layers deep."""
    return _built(
        UNet2DConditionModel,
        seed,
        **{
            **_TINY_UNET,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "transformer_layers_per_block": (1, 2),
            "projection_class_embeddings_input_dim": SDXL_TEXT_EMBEDS + 6 * 8,
            "cross_attention_dim": 64,
        },
    )


def sdxl_inputs(batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs of an SDXL UNet call, as the SDXL pipelines pass them."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": _noise(g, batch, 4, 16, 16),
        "timestep": torch.tensor([10, 500][:batch]),
        "encoder_hidden_states": _noise(g, batch, 7, 64),
        "added_cond_kwargs": {
            "text_embeds": _noise(g, batch, SDXL_TEXT_EMBEDS),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * batch),
        },
    }


#: what the tiny SD3 and Flux transformers share: head size, text and pooled widths
_TINY_DIT = dict(attention_head_dim=8, joint_attention_dim=32, pooled_projection_dim=16)


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """An SD3 MMDiT: four joint blocks (the last one context-pre-only), patch size 2, 4 latent channels."""
    config = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, pos_embed_max_size=16)
    return _built(SD3Transformer2DModel, seed, **config, **_TINY_DIT, caption_projection_dim=32, num_attention_heads=4)


def sd3_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": _noise(g, batch, 4, 16, 16),
        "encoder_hidden_states": _noise(g, batch, 7, 32),
        "pooled_projections": _noise(g, batch, 16),
        "timestep": torch.tensor([10.0, 500.0][:batch]),
    }


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """A Flux DiT: three double-stream and four single-stream blocks, guidance embedding, packed latents of 16."""
    config = dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=4, guidance_embeds=True)
    return _built(FluxTransformer2DModel, seed, **config, **_TINY_DIT, num_attention_heads=2, axes_dims_rope=(2, 2, 4))


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """Positions of packed latent tokens, as ``FluxPipeline._prepare_latent_image_ids`` lays them out."""
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3).float()


def flux_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": _noise(g, batch, 64, 16),  # 8x8 packed latent tokens
        "encoder_hidden_states": _noise(g, batch, 7, 32),
        "pooled_projections": _noise(g, batch, 16),
        "timestep": torch.tensor([0.01, 0.5][:batch]),
        "img_ids": flux_image_ids(8, 8),
        "txt_ids": torch.zeros(7, 3),
        "guidance": torch.tensor([3.5] * batch),
    }
