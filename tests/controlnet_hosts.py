"""Tiny hosts of the ControlNet plugins, built locally from configs (no downloads), with fixed inputs and helpers.

SDXL-shaped UNet (``text_time`` added embedding), SD3 and Flux transformers, each small enough that a
forward and backward take milliseconds on one CPU thread.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import (
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import nn

import peft_hcp

SDXL_TEXT_EMBEDS = 32  # projection_class_embeddings_input_dim - 6 time ids * addition_time_embed_dim


def _noise(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SDXL-shaped UNet: ``text_time`` added embedding, linear projections, two transformer layers deep."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=SDXL_TEXT_EMBEDS + 6 * 8,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()


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


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """An SD3 MMDiT: four joint blocks (the last one context-pre-only), patch size 2, 4 latent channels."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


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
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=3,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


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


#: name -> (host builder, call inputs, shape of one control input); SDXL takes an image twice the latent size.
HOSTS: dict[str, tuple[Callable[[], nn.Module], Callable[..., dict], tuple[int, ...]]] = {
    "sdxl": (tiny_sdxl_unet, sdxl_inputs, (3, 32, 32)),
    "sd3": (tiny_sd3, sd3_inputs, (4, 16, 16)),
    "flux": (tiny_flux, flux_inputs, (64, 16)),
}


def control(kind: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A fixed control input for the host ``kind``: an image in [0, 1] (UNet) or latents (DiTs)."""
    g = torch.Generator().manual_seed(seed)
    shape = HOSTS[kind][2]
    return torch.rand(batch, *shape, generator=g) if kind == "sdxl" else torch.randn(batch, *shape, generator=g)


def fed_output(model: nn.Module, inputs: dict, cond: torch.Tensor) -> torch.Tensor:
    with peft_hcp.feed(model, cond=cond), torch.no_grad():
        return model(**inputs).sample


def train(model: nn.Module, inputs: dict, cond: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps pulling the prediction towards a fixed target; the losses, first to last."""
    target = torch.randn(inputs[next(iter(inputs))].shape, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        with peft_hcp.feed(model, cond=cond):
            loss = (model(**inputs).sample - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
