"""Looking through PEFT tuner layers: a host wrapped by adapters (of any type, stacked) is still that host."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """The PEFT tuner layers wrapped around a host at ``module``, outermost first (none for an unwrapped one)."""
    layers: list[BaseTunerLayer] = []
    layer: Any = module
    while isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
        layers.append(layer)
        layer = layer.base_layer
    return layers


def base_module(module: nn.Module) -> nn.Module:
    """``module`` itself, or the host under the PEFT tuner layers wrapped around it."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
