"""The learned skip connection of HCP-Diffusion's guide, as a from -> to plugin.

``SkipBlock`` maps the from-layer's first input to the to-layer's output (or, with a ``prehook:`` to-layer,
to its first input) through a ``Linear`` (a 1x1 ``Conv2d`` between convolutions) and adds it::

    get_peft_model(unet, HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"]))

With ``init_weights=True`` the projection starts at zero, so the host is unchanged until trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peft_hcp.errors import UnsupportedLayerError
from peft_hcp.hooked import HcpHookedModel, HcpPluginConfig, PluginBlock, PluginLayer
from peft_hcp.selectors import Target


def _features(target: Target, side: str) -> int:
    """Input (``side='in'``) or output features of a Linear / Conv2d layer."""
    module = target.module.get_base_layer() if hasattr(target.module, "get_base_layer") else target.module
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "in" else module.out_channels
    raise UnsupportedLayerError(
        f"SkipBlock needs nn.Linear or nn.Conv2d layers; {target.name!r} is {type(module).__name__}."
    )


class SkipBlock(PluginBlock):
    """``fea_out + proj(fea_from[0]) * scaling`` (``fea_in[0] + ...`` for a ``prehook:`` to-layer)."""

    def __init__(self, from_layer: Target, to_layer: Target, config: "HcpSkipConfig") -> None:
        super().__init__(from_layer, to_layer, config)
        in_features = _features(from_layer, "in")
        out_features = _features(to_layer, "in" if to_layer.prehook else "out")
        host = from_layer.module.get_base_layer() if hasattr(from_layer.module, "get_base_layer") else from_layer.module
        if isinstance(host, nn.Conv2d):
            self.layer: nn.Module = nn.Conv2d(in_features, out_features, 1, bias=config.skip_bias)
        else:
            self.layer = nn.Linear(in_features, out_features, bias=config.skip_bias)
        if config.init_weights:
            nn.init.zeros_(self.layer.weight)
            if self.layer.bias is not None:
                nn.init.zeros_(self.layer.bias)

    def forward(self, fea_from: tuple, fea_in: tuple, fea_out: Optional[torch.Tensor]) -> Any:
        base = fea_in[0] if fea_out is None else fea_out
        skip = self.layer(fea_from[0].to(self.layer.weight.dtype)) * self.scaling
        return base + skip.to(base.dtype)


@dataclass
class HcpSkipConfig(HcpPluginConfig):
    """A learned skip from each from-layer's input to its paired to-layer (see :class:`SkipBlock`)."""

    skip_bias: bool = True


class HcpSkipContainer(PluginLayer, type_name="hcp_skip", block_cls=SkipBlock):
    """The container of ``hcp_skip`` (``model.hcp_skip``): the skips of every adapter and their hooks."""


class HcpSkipModel(HcpHookedModel, layer_cls=HcpSkipContainer, config_cls=HcpSkipConfig):
    """The PEFT tuner of ``hcp_skip``; defining it registers the type with PEFT."""
