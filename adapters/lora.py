"""LoRA as a single-layer plugin on the output route: ``out + up(down(dropout(x))) * scaling``.

With ``use_dora`` it is DoRA (PEFT's ``LoraConfig(use_dora=True)``): the weight ``W + ΔW`` is rescaled per
output channel to a trained magnitude ``dora_scale`` (LyCORIS's name and layout, ``(out, 1, ...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from peft_hcp.errors import CheckpointError
from peft_hcp.single import HcpSingleConfig, HcpSingleModel, SinglePluginLayer
from peft_hcp.single.dropout import dropout_down
from peft_hcp.single.lowrank import (
    LowRankBlock,
    check_rank,
    host_shape,
    resolve_rank,
    scaling,
)


class LoraBlock(LowRankBlock):
    """``lora_down`` (in -> rank, the host's kernel for convolutions), then ``lora_up`` (rank -> out, 1x1)."""

    kohya_required = ("lora_down.weight", "lora_up.weight")
    kohya_weights = (*kohya_required, "dora_scale")
    rank_dims = {"lora_down.weight": 0, "lora_up.weight": 1}
    scale_weight = "lora_up.weight"

    def __init__(self, host: nn.Module, config: HcpLoraConfig) -> None:
        super().__init__(host, config)
        in_features, out_features = host_shape(host)
        self.rank = resolve_rank(config.r, out_features)
        if isinstance(host, nn.Linear):
            self.lora_down = nn.Linear(in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, out_features, bias=config.lora_bias)
        else:
            self.lora_down = nn.Conv2d(
                in_features, self.rank, host.kernel_size, host.stride, host.padding, host.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(self.rank, out_features, 1, bias=config.lora_bias)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.base_scaling = self.scaling = scaling(config.alpha, self.rank, config.alpha_auto_scale)
        if config.init_weights:
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)
            if self.lora_up.bias is not None:
                nn.init.zeros_(self.lora_up.bias)
        if config.use_dora:
            # DoRA's norm is of the host's weight: keep a reference to it, outside the block's modules and state
            self.__dict__["_dora_host"] = host
            with torch.no_grad():  # PEFT's magnitude: the norm of the adapted weight, per output channel
                self.dora_scale = nn.Parameter(_out_norm(self._adapted(host.weight)))

    def forward(self, fea_in: tuple[torch.Tensor, ...], fea_out: torch.Tensor) -> torch.Tensor:
        if "dora_scale" in self._parameters:
            return self._dora_forward(fea_in[0], fea_out)
        x = fea_in[0].to(self.lora_down.weight.dtype)
        return fea_out + (self.lora_up(dropout_down(x, self.lora_down, self.dropout)) * self.scaling).to(fea_out.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scaling

    def get_delta_bias(self) -> Optional[torch.Tensor]:
        return None if self.lora_up.bias is None else self.lora_up.bias * self.scaling

    # -- DoRA ----------------------------------------------------------------------------------

    def _adapted(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW`` with ΔW detached: merging, and DoRA's norm, which takes no gradient."""
        return weight + self.get_delta_weight().detach().to(weight.dtype).reshape(weight.shape)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        adapted = self._adapted(weight)
        if "dora_scale" not in self._parameters:
            return adapted
        return adapted * (self.dora_scale.detach() / _out_norm(adapted)).to(weight.dtype)

    def _dora_forward(self, x: torch.Tensor, fea_out: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA: ``out + (m/‖W+ΔW‖ - 1) · W x + m/‖W+ΔW‖ · ΔW x``, the norm detached (as the paper
        advises, so it is no part of the gradient). ``W x`` is the host's output less its bias, or, under
        active dropout, recomputed from the dropped-out input as PEFT does."""
        host = self._dora_host
        x = x.to(self.lora_down.weight.dtype)
        weight = host.weight.to(x.dtype)
        norm = _out_norm(self._adapted(weight)).detach()
        shape = (-1, 1, 1) if isinstance(host, nn.Conv2d) else (-1,)
        factor = (self.dora_scale / norm).reshape(shape)
        dropped = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = fea_out.to(x.dtype) if host.bias is None else fea_out.to(x.dtype) - host.bias.reshape(shape)
        elif isinstance(host, nn.Conv2d):
            base = F.conv2d(dropped, weight, None, host.stride, host.padding, host.dilation, host.groups)
        else:
            base = F.linear(dropped, weight)
        extra = (factor - 1) * base + factor * self.lora_up(self.lora_down(dropped)) * self.scaling
        return fea_out + extra.to(fea_out.dtype)

    @classmethod
    def config_kwargs_from_kohya(cls, layers: dict[str, dict[str, torch.Tensor]]) -> dict:
        kwargs = super().config_kwargs_from_kohya(layers)
        return {**kwargs, "use_dora": any("dora_scale" in tensors for tensors in layers.values())}

    def load_kohya(self, tensors: dict[str, torch.Tensor], layer: str) -> None:
        """Also take ``dora_scale`` in PEFT's/diffusers' layout (``(out,)``, ``(1, out, 1, 1)``); a layer without
        one in a DoRA file gets the magnitude that makes it plain LoRA."""
        if "dora_scale" in self._parameters and "dora_scale" in tensors:
            magnitude, out_features = tensors["dora_scale"], self.dora_scale.shape[0]
            if magnitude.numel() != out_features:
                raise CheckpointError(
                    f"Layer {layer}: dora_scale {tuple(magnitude.shape)} is not one value per output channel "
                    f"({out_features}); input-side DoRA (LyCORIS wd_on_out=False) is not supported."
                )
            tensors = {**tensors, "dora_scale": magnitude.reshape(self.dora_scale.shape)}
        super().load_kohya(tensors, layer)
        if "dora_scale" in self._parameters and "dora_scale" not in tensors:
            with torch.no_grad():
                self.dora_scale.copy_(_out_norm(self._adapted(self._dora_host.weight)))

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        if self.lora_up.bias is not None:
            raise ValueError("kohya/LyCORIS files have no LoRA bias; train without lora_bias to export.")
        return super().kohya_tensors()

    def lora_factors(self, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if "dora_scale" in self._parameters:
            return super().lora_factors(host)  # refused: no exact form without a magnitude
        if self.lora_up.bias is not None:
            raise ValueError("diffusers' LoRA layout has no lora_B bias here; train without lora_bias to export.")
        return self.lora_down.weight.detach().clone(), self.lora_up.weight.detach() * self.scaling


def _out_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output channel's weights, shaped ``(out, 1, ...)`` to broadcast over ``weight``."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


@dataclass
class HcpLoraConfig(HcpSingleConfig):
    """LoRA on ``nn.Linear`` / ``nn.Conv2d`` layers, with HCP-Diffusion's parameters.

    ``r`` is the rank, or with a float, a fraction of each host's output features. The update is
    scaled by ``alpha / rank`` when ``alpha_auto_scale`` (PEFT's ``lora_alpha / r``), else by ``alpha``.
    ``bias=True`` (HCP) is PEFT's ``lora_bias=True``; PEFT's string values of ``bias`` work as in PEFT.
    """

    r: Union[int, float] = field(default=4, metadata={"help": "Rank, or a float ratio of the output features."})
    alpha: float = field(default=1.0, metadata={"help": "Strength; divided by the rank when alpha_auto_scale."})
    alpha_auto_scale: bool = field(default=True, metadata={"help": "Scale by alpha / rank instead of alpha."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    bias: Union[bool, str] = field(
        default="none",
        metadata={
            "help": "HCP: True gives lora_up a bias (stored as lora_bias=True). PEFT: 'none', 'all' or "
            "'hcp_lora_only' train the host biases too."
        },
    )
    lora_bias: bool = field(default=False, metadata={"help": "Give lora_up a trainable bias (PEFT's name)."})
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: rescale W + ΔW per output channel to a trained magnitude (PEFT's name)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bias, bool):  # HCP's boolean means a bias on the LoRA path
            self.lora_bias, self.bias = self.lora_bias or self.bias, "none"
        if self.bias not in ("none", "all", "hcp_lora_only"):
            raise ValueError(f"bias must be a bool, 'none', 'all' or 'hcp_lora_only', got {self.bias!r}.")
        check_rank(self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora and a LoRA bias (lora_bias, HCP's bias=True) cannot be combined, as in PEFT.")


class HcpLoraLayer(SinglePluginLayer, type_name="hcp_lora", block_cls=LoraBlock):
    """The PEFT tuner layer of ``hcp_lora``: wraps a Linear/Conv2d host and runs its :class:`LoraBlock` s."""


class HcpLoraModel(HcpSingleModel, layer_cls=HcpLoraLayer, config_cls=HcpLoraConfig):
    """The PEFT tuner of ``hcp_lora``; defining it registers the type with PEFT."""
