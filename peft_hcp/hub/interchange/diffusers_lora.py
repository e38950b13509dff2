"""Export to diffusers' LoRA layout, which stock ``pipe.load_lora_weights(folder)`` loads.

Keys are ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``. diffusers takes the rank from
the weights and uses ``lora_alpha = r`` when the file carries no alphas, so each block gives its
factors with its scale folded into ``lora_B`` (:meth:`~peft_hcp.single.lowrank.LowRankBlock.lora_factors`):
outputs match, the HCP ``alpha`` is not kept (use the kohya format or the adapter set for that). A
variant with no exact LoRA form (a LoRA with a bias, LoKr …) is refused, naming it, and so is a file
whose layers the stock loader would not place where they came from (:mod:`.stock`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import save_file

from peft_hcp.hub.interchange.blocks import host_layer, lowrank_blocks
from peft_hcp.hub.interchange.stock import (
    check_placement,
    interchange_components,
    loader_class,
)


#: the file name ``load_lora_weights`` looks for in a folder
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_diffusers(target, save_directory: str, adapter_names: Optional[list[str]] = None) -> str:
    """Write the LoRA/LoHa adapters of a pipeline, model or ``PeftModel`` to ``save_directory`` in diffusers' layout."""
    components = interchange_components(target)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}
    for component, module in components.items():
        for name, _adapter, block in lowrank_blocks(module, adapter_names):
            key = f"{component}.{name}"
            if key in origin:
                raise ValueError(f"Two adapters adapt {name!r}; export them one at a time (adapter_names=[...]).")
            origin[key] = (component, name)
            down, up = block.lora_factors(host_layer(module, name))
            tensors[f"{key}.lora_A.weight"] = down.contiguous()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no low-rank adapters to export.")
    check_placement(origin, loader_class(target, components), components, diffusers_layout=True)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, LORA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
