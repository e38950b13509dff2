"""How a :class:`~peft_hcp.adapters.lora.LoraBlock` computes, merges and reads files: plain LoRA or DoRA.

As PEFT keeps DoRA as a ``LoraVariant`` (``peft/tuners/lora/variants.py``), a LoRA block holds one variant
object and delegates to it; the variants are stateless, their methods take the block. DoRA's magnitude is
the block's parameter ``dora_scale`` (LyCORIS's name and layout, ``(out, 1, ...)``), so files keep their keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peft_hcp.errors import CheckpointError
from peft_hcp.quant.hosts import dequantized_weight
from peft_hcp.single.dropout import dropout_down


if TYPE_CHECKING:
    from peft_hcp.adapters.lora import LoraBlock

KohyaLoader = Callable[[dict[str, torch.Tensor], str], None]


class LoraVariant:
    """Plain LoRA: ``out + up(down(dropout(x))) * scaling``. A variant overrides what it changes."""

    @staticmethod
    def init(block: LoraBlock, host: nn.Module) -> None:
        """Add the variant's parameters to a new ``block`` on ``host``."""

    @staticmethod
    def forward(block: LoraBlock, x: torch.Tensor, fea_out: torch.Tensor) -> torch.Tensor:
        """The host's output ``fea_out`` for input ``x``, adapted."""
        x = x.to(block.lora_down.weight.dtype)
        return fea_out + (block.lora_up(dropout_down(x, block.lora_down, block.dropout)) * block.scaling).to(
            fea_out.dtype
        )

    @staticmethod
    def merged_weight(block: LoraBlock, weight: torch.Tensor) -> torch.Tensor:
        """The host weight ``weight`` with the block folded in."""
        return block.adapted_weight(weight)

    @staticmethod
    def load_kohya(block: LoraBlock, tensors: dict[str, torch.Tensor], layer: str, load: KohyaLoader) -> None:
        """Read one kohya/LyCORIS file layer into ``block`` through the low-rank loader ``load``."""
        load(tensors, layer)

    @staticmethod
    def lora_factors(block: LoraBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` of diffusers' LoRA layout, the scale folded into ``lora_B``."""
        if block.lora_up.bias is not None:
            raise ValueError("diffusers' LoRA layout has no lora_B bias here; train without lora_bias to export.")
        return block.lora_down.weight.detach().clone(), block.lora_up.weight.detach() * block.scaling


class DoraVariant(LoraVariant):
    """DoRA (PEFT's ``use_dora``): ``W + ΔW`` rescaled per output channel to the trained magnitude ``dora_scale``."""

    @staticmethod
    def init(block: LoraBlock, host: nn.Module) -> None:
        # DoRA's norm is of the host's weight: keep a reference to it, outside the block's modules and state
        block.__dict__["_dora_host"] = host
        with torch.no_grad():  # PEFT's magnitude: the norm of the adapted weight, per output channel
            block.dora_scale = nn.Parameter(out_norm(block.adapted_weight(dequantized_weight(host))))

    @staticmethod
    def forward(block: LoraBlock, x: torch.Tensor, fea_out: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA: ``out + (m/‖W+ΔW‖ - 1) · W x + m/‖W+ΔW‖ · ΔW x``, the norm detached (as the paper
        advises, so it is no part of the gradient). ``W x`` is the host's output less its bias, or, under
        active dropout, recomputed from the dropped-out input as PEFT does."""
        host = block._dora_host
        x = x.to(block.lora_down.weight.dtype)
        weight = dequantized_weight(host).to(x.dtype)  # a quantized host's too
        norm = out_norm(block.adapted_weight(weight)).detach()
        shape = (-1, 1, 1) if isinstance(host, nn.Conv2d) else (-1,)
        factor = (block.dora_scale / norm).reshape(shape)
        dropped = block.dropout(x)
        if isinstance(block.dropout, nn.Identity) or not block.training:
            base = (
                fea_out.to(x.dtype) if host.bias is None else fea_out.to(x.dtype) - host.bias.to(x.dtype).reshape(shape)
            )
        elif isinstance(host, nn.Conv2d):
            base = F.conv2d(dropped, weight, None, host.stride, host.padding, host.dilation, host.groups)
        else:
            base = F.linear(dropped, weight)
        extra = (factor - 1) * base + factor * block.lora_up(block.lora_down(dropped)) * block.scaling
        return fea_out + extra.to(fea_out.dtype)

    @staticmethod
    def merged_weight(block: LoraBlock, weight: torch.Tensor) -> torch.Tensor:
        adapted = block.adapted_weight(weight)
        return adapted * (block.dora_scale.detach() / out_norm(adapted)).to(weight.dtype)

    @staticmethod
    def load_kohya(block: LoraBlock, tensors: dict[str, torch.Tensor], layer: str, load: KohyaLoader) -> None:
        """Also take ``dora_scale`` in PEFT's/diffusers' layout (``(out,)``, ``(1, out, 1, 1)``); a layer without
        one in a DoRA file gets the magnitude that makes it plain LoRA."""
        if "dora_scale" not in tensors:
            load(tensors, layer)
            with torch.no_grad():
                block.dora_scale.copy_(out_norm(block.adapted_weight(dequantized_weight(block._dora_host))))
            return
        magnitude, out_features = tensors["dora_scale"], block.dora_scale.shape[0]
        if magnitude.numel() != out_features:
            raise CheckpointError(
                f"Layer {layer}: dora_scale {tuple(magnitude.shape)} is not one value per output channel "
                f"({out_features}); input-side DoRA (LyCORIS wd_on_out=False) is not supported."
            )
        load({**tensors, "dora_scale": magnitude.reshape(block.dora_scale.shape)}, layer)

    @staticmethod
    def lora_factors(block: LoraBlock) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(
            "DoRA has no exact form in diffusers' LoRA layout (its magnitude rescales W + ΔW); "
            "export it as a kohya/LyCORIS file."
        )


def out_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output channel's weights, shaped ``(out, 1, ...)`` to broadcast over ``weight``."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
