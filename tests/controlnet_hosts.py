"""The tiny hosts of the ControlNet plugins (SDXL-shaped UNet, SD3, Flux from :mod:`peft_hcp.embedded`),
with their control inputs and a short training loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import peft_hcp
from peft_hcp.embedded.models import (
    flux_inputs,
    sd3_inputs,
    sdxl_inputs,
    tiny_flux,
    tiny_sd3,
    tiny_sdxl_unet,
)


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
