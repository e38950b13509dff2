"""The learned skip connection of HCP-Diffusion's guide, as a from -> to plugin.

``SkipBlock`` maps the from-layer's first input to the to-layer's output (or, with a ``prehook:`` to-layer,
to its first input) through a learned projection and adds it::

    get_peft_model(unet, HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"]))

The layers may be ``Linear`` / ``Conv2d`` layers (the widths are theirs) or whole blocks, a long skip
between transformer blocks of a DiT or ResNets of a UNet; then ``features`` gives the width of the hidden
states::

    HcpSkipConfig(from_layer=["transformer_blocks.0"], to_layer=["single_transformer_blocks.3"],
                  features=3072, to_element=1)   # Flux's blocks return (encoder_hidden_states, hidden_states)

What is read and written: the from-layer's first input (its first positional argument, or its first keyword
argument when called with keywords only); the to-layer's output element ``to_element`` (a tensor is itself,
a tuple gives that item, a ``BaseOutput``/dataclass that field), or its first input for ``prehook:``. The
projection acts on the last dim of tokens ``(B, N, D)`` and on the channels of feature maps ``(B, C, H, W)``.

With ``init_weights=True`` the projection starts at zero, so the host is unchanged until trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import UnsupportedLayerError
from peft_hcp.hooked import HcpHookedModel, HcpPluginConfig, PluginBlock, PluginLayer
from peft_hcp.hooked.block import element, with_element
from peft_hcp.selectors import Target


def _features(target: Target, side: str, given: Optional[int], pair: str) -> int:
    """Input (``side='in'``) or output width of a Linear / Conv2d layer, else the configured ``features``."""
    module = base_module(target.module)
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "in" else module.out_channels
    if given is None:
        raise UnsupportedLayerError(
            f"SkipBlock {pair}: {target.name!r} is {type(module).__name__}, whose width is not known; set "
            "`features` in HcpSkipConfig to the width of its hidden states (the last dim of tokens (B, N, D), the "
            "channels of feature maps (B, C, H, W)), or to [from_width, to_width]."
        )
    return given


class SkipBlock(PluginBlock):
    """``fea_out + proj(fea_from[0]) * scaling`` (``fea_in[0] + ...`` for a ``prehook:`` to-layer)."""

    def __init__(self, from_layer: Target, to_layer: Target, config: HcpSkipConfig) -> None:
        super().__init__(from_layer, to_layer, config)
        widths = config.features if isinstance(config.features, (list, tuple)) else [config.features] * 2
        pair = f"from {from_layer.name!r} to {to_layer.name!r}"
        in_features = _features(from_layer, "in", widths[0], pair)
        out_features = _features(to_layer, "in" if to_layer.prehook else "out", widths[1], pair)
        self.to_element = config.to_element
        # a Linear from-layer's input has its features last, whatever its rank; a block's feature map has them at dim 1
        self.features_last = isinstance(base_module(from_layer.module), nn.Linear)
        if isinstance(base_module(from_layer.module), nn.Conv2d):
            self.layer: nn.Module = nn.Conv2d(in_features, out_features, 1, bias=config.skip_bias)
        else:
            self.layer = nn.Linear(in_features, out_features, bias=config.skip_bias)
        if config.init_weights:
            nn.init.zeros_(self.layer.weight)
            if self.layer.bias is not None:
                nn.init.zeros_(self.layer.bias)

    def feature_dim(self, x: torch.Tensor) -> int:
        """Where ``x`` keeps its features: dim 1 of a feature map ``(B, C, H, W)``, else the last dim."""
        return 1 if x.dim() == 4 and not self.features_last else -1

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.layer.weight.dtype)
        if isinstance(self.layer, nn.Linear) and self.feature_dim(x) == 1:
            return F.conv2d(x, self.layer.weight[:, :, None, None], self.layer.bias)
        return self.layer(x)

    def forward(self, fea_from: tuple, fea_in: tuple, fea_out: Optional[Any]) -> Any:
        target = fea_in[0] if fea_out is None else element(fea_out, self.to_element)
        source = fea_from[0]
        width = source.shape[self.feature_dim(source)]
        if width != self.layer.weight.shape[1]:
            raise ValueError(self._mismatch(f"the from-layer's hidden states are {width} wide", source, target))
        skip = self.project(source) * self.scaling
        if skip.shape != target.shape:
            raise ValueError(self._mismatch(f"the skip {tuple(skip.shape)} does not fit", source, target))
        new = target + skip.to(target.dtype)
        return new if fea_out is None else with_element(fea_out, self.to_element, new)

    def _mismatch(self, what: str, source: torch.Tensor, target: torch.Tensor) -> str:
        return (
            f"SkipBlock (adapter {self.adapter_name!r}) from {self.from_name!r} {tuple(source.shape)} to "
            f"{self.to_name!r} {tuple(target.shape)}: {what}; the projection maps {self.layer.weight.shape[1]} to "
            f"{self.layer.weight.shape[0]} features (HcpSkipConfig `features`, `to_element`)."
        )


@dataclass
class HcpSkipConfig(HcpPluginConfig):
    """A learned skip from each from-layer's input to its paired to-layer (see :class:`SkipBlock`)."""

    skip_bias: bool = True
    features: Optional[Union[int, list[int]]] = field(
        default=None,
        metadata={
            "help": "Width of the hidden states where a layer is not a Linear/Conv2d (a whole block): one int, "
            "or [from_width, to_width]."
        },
    )
    to_element: int = field(
        default=0,
        metadata={"help": "Which element of a tuple (or dataclass) to-layer output gets the skip; Flux's blocks: 1."},
    )


class HcpSkipContainer(PluginLayer, type_name="hcp_skip", block_cls=SkipBlock):
    """The container of ``hcp_skip`` (``model.hcp_skip``): the skips of every adapter and their hooks."""


class HcpSkipModel(HcpHookedModel, layer_cls=HcpSkipContainer, config_cls=HcpSkipConfig):
    """The PEFT tuner of ``hcp_skip``; defining it registers the type with PEFT."""
