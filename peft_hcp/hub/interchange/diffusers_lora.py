"""Export to diffusers' LoRA layout, which stock ``pipe.load_lora_weights(folder)`` loads.

Keys are ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``. diffusers takes the rank from
the weights and uses ``lora_alpha = r`` when the file carries no alphas, so each block's scale is
folded into ``lora_B``: outputs match, the HCP ``alpha`` is not kept (use the kohya format or the
adapter set for that). A LoHa block is written as the LoRA of rank ``r * r`` that equals it exactly:
``(A1 B1) * (A2 B2) = (A1 ⊙ A2)(B1 ⊙ B2)`` with column-wise / row-wise Khatri-Rao products.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from diffusers import ModelMixin
from safetensors.torch import save_file
from torch import nn

from peft_hcp.adapters.loha import LohaBlock
from peft_hcp.hub.adapter_set import plugin_components
from peft_hcp.hub.interchange.blocks import host_layer, lowrank_blocks

#: the file name ``load_lora_weights`` looks for in a folder
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_diffusers(target, save_directory: str, adapter_names: Optional[list[str]] = None) -> str:
    """Write the LoRA/LoHa adapters of a pipeline or model to ``save_directory`` in diffusers' layout."""
    tensors: dict[str, torch.Tensor] = {}
    for component, module in plugin_components(target).items():
        prefix = component or ("unet" if isinstance(module, ModelMixin) else "text_encoder")
        for name, adapter, block in lowrank_blocks(module, adapter_names):
            key = f"{prefix}.{name}"
            if f"{key}.lora_A.weight" in tensors:
                raise ValueError(f"Two adapters adapt {name!r}; export them one at a time (adapter_names=[...]).")
            down, up = _lora_factors(block, host_layer(module, name))
            tensors[f"{key}.lora_A.weight"] = down.contiguous()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no LoRA or LoHa adapters to export.")
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, LORA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _lora_factors(block: nn.Module, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) with the block's current scale folded into lora_B."""
    with torch.no_grad():
        if isinstance(block, LohaBlock):
            return _loha_as_lora(block, host)
        if block.lora_up.bias is not None:
            raise ValueError("diffusers' LoRA layout has no lora_B bias here; train without lora_bias to export.")
        return block.lora_down.weight.clone(), block.lora_up.weight * block.scaling


def _loha_as_lora(block: LohaBlock, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if block.rank_groups != 2:
        raise ValueError(f"Only two-pair LoHa blocks convert to LoRA; this one has {block.rank_groups}.")
    a1, b1, a2, b2 = block.hada_w1_a, block.hada_w1_b, block.hada_w2_a, block.hada_w2_b
    up = (a1[:, :, None] * a2[:, None, :]).flatten(1) * block.scaling  # (out, r*r)
    down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # (r*r, fan_in)
    if isinstance(host, nn.Conv2d):
        down = down.reshape(down.shape[0], *host.weight.shape[1:])
        up = up[:, :, None, None]
    return down, up
