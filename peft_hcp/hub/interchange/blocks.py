"""The low-rank plugin blocks of a model by host layer, for export; the variant of a file's layers, for import."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from peft_hcp.base.unwrap import base_module, tuner_layers
from peft_hcp.errors import CheckpointError
from peft_hcp.selectors import selectable_modules
from peft_hcp.single import SinglePluginLayer
from peft_hcp.single.lowrank import LowRankBlock, lowrank_type_of


def lowrank_blocks(
    model: nn.Module, adapter_names: Optional[list[str]] = None
) -> Iterator[tuple[str, str, LowRankBlock]]:
    """``(host module name, adapter name, block)`` for every low-rank block, stacked wrappers included."""
    for name, module in selectable_modules(model):
        for layer in tuner_layers(module):
            if isinstance(layer, SinglePluginLayer):
                for adapter, block in layer.blocks.items():
                    if isinstance(block, LowRankBlock) and (adapter_names is None or adapter in adapter_names):
                        yield name, adapter, block


def one_block_per_layer(
    model: nn.Module, adapter_names: Optional[list[str]], file_kind: str
) -> dict[str, LowRankBlock]:
    """``{host module name: block}`` for a ``file_kind`` that holds one network per layer: a layer two of the
    adapters adapt is refused, naming both."""
    blocks: dict[str, LowRankBlock] = {}
    owner: dict[str, str] = {}
    for name, adapter, block in lowrank_blocks(model, adapter_names):
        if name in blocks:
            raise ValueError(
                f"Adapters {owner[name]!r} and {adapter!r} both adapt {name!r}; a {file_kind} holds one network per "
                "layer. Export them one at a time (adapter_names=[...])."
            )
        blocks[name], owner[name] = block, adapter
    return blocks


def host_layer(model: nn.Module, name: str) -> nn.Module:
    """The original layer called ``name``, looking through adapter wrappers."""
    return base_module(model.get_submodule(name))


def file_variant(layers: dict[str, dict[str, torch.Tensor]], path: str, alpha_is_scale: bool) -> type[LowRankBlock]:
    """The one low-rank variant of a file's ``{layer: tensors}``, refused by name when they mix variants.

    ``alpha_is_scale``: the file's ``alpha`` is the layer's scale (HCP-Diffusion's webui export); it is made
    kohya's ``alpha`` (scale × rank) in place.
    """
    kinds = {layer: lowrank_type_of(set(parts), layer, path) for layer, parts in layers.items()}
    if len(set(kinds.values())) != 1:
        found = sorted({cls.__name__ for cls in kinds.values()})
        raise CheckpointError(f"{path} mixes low-rank variants {found}; import one variant per file.")
    block_cls = next(iter(kinds.values()))
    if alpha_is_scale:
        for parts in layers.values():
            if "alpha" in parts:
                parts["alpha"] = parts["alpha"] * block_cls.kohya_rank(parts)
    return block_cls
