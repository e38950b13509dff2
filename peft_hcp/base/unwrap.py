"""Looking through PEFT tuner layers: a host wrapped by adapters (of any type, stacked) is still that host."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """The PEFT tuner layers wrapped around a host at ``module``, outermost first (none for an unwrapped one)."""
    layers = []
    while isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
        layers.append(module)
        module = module.base_layer
    return layers


def base_module(module: nn.Module) -> nn.Module:
    """``module`` itself, or the host under the PEFT tuner layers wrapped around it."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
