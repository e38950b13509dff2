"""Finding the low-rank plugin blocks of a model, by host layer, for export."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from torch import nn

from peft_hcp.base.unwrap import base_module, tuner_layers
from peft_hcp.selectors import selectable_modules
from peft_hcp.single import SinglePluginLayer
from peft_hcp.single.lowrank import LowRankBlock


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


def host_layer(model: nn.Module, name: str) -> nn.Module:
    """The original layer called ``name``, looking through adapter wrappers."""
    return base_module(model.get_submodule(name))
