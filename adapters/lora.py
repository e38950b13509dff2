"""LoRA as a single-layer plugin on the output route: ``out + up(down(dropout(x))) * scaling``.

With ``use_dora`` it is DoRA (PEFT's ``LoraConfig(use_dora=True)``): the weight ``W + ΔW`` is rescaled per
output channel to a trained magnitude ``dora_scale`` (LyCORIS's name and layout, ``(out, 1, ...)``); the block
then holds the DoRA variant of :mod:`.lora_variants`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from peft_hcp.adapters.lora_variants import DoraVariant, LoraVariant
from peft_hcp.single import HcpSingleModel, SinglePluginLayer
from peft_hcp.single.lowrank import (
    LowRankBlock,
    LowRankConfig,
    host_shape,
    resolve_rank,
    scaling,
)


class LoraBlock(LowRankBlock):
    """``lora_down`` (in -> rank, the host's kernel for convolutions), then ``lora_up`` (rank -> out, 1x1).

    How it computes, merges and reads files is its ``variant``'s (:mod:`.lora_variants`): plain LoRA, or DoRA.
    """

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
        self.variant: LoraVariant = DoraVariant() if config.use_dora else LoraVariant()
        self.variant.init(self, host)

    def forward(self, fea_in: tuple[torch.Tensor, ...], fea_out: torch.Tensor) -> torch.Tensor:
        return self.variant.forward(self, fea_in[0], fea_out)

    def get_delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scaling

    def get_delta_bias(self) -> Optional[torch.Tensor]:
        return None if self.lora_up.bias is None else self.lora_up.bias * self.scaling

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + ΔW`` with ΔW detached: plain LoRA's merged weight, and what DoRA takes the norm of."""
        return super().merged_weight(weight)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.variant.merged_weight(self, weight)

    @classmethod
    def config_kwargs_from_kohya(cls, layers: dict[str, dict[str, torch.Tensor]], hosts: dict[str, nn.Module]) -> dict:
        kwargs = super().config_kwargs_from_kohya(layers, hosts)
        return {**kwargs, "use_dora": any("dora_scale" in tensors for tensors in layers.values())}

    def load_kohya(self, tensors: dict[str, torch.Tensor], layer: str) -> None:
        self.variant.load_kohya(self, tensors, layer, super().load_kohya)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        if self.lora_up.bias is not None:
            raise ValueError("kohya/LyCORIS files have no LoRA bias; train without lora_bias to export.")
        return super().kohya_tensors()

    def lora_factors(self, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.variant.lora_factors(self)


@dataclass
class HcpLoraConfig(LowRankConfig):
    """LoRA on ``nn.Linear`` / ``nn.Conv2d`` layers, with HCP-Diffusion's parameters.

    ``r`` is the rank, or with a float, a fraction of each host's output features. The update is
    scaled by ``alpha / rank`` when ``alpha_auto_scale`` (PEFT's ``lora_alpha / r``), else by ``alpha``.
    ``rank_pattern`` / ``alpha_pattern`` set them per layer, as PEFT's (see :class:`LowRankConfig`).
    ``bias=True`` (HCP) is PEFT's ``lora_bias=True``; PEFT's string values of ``bias`` work as in PEFT.
    """

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
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.use_dora and self.lora_bias:
            raise ValueError("use_dora and a LoRA bias (lora_bias, HCP's bias=True) cannot be combined, as in PEFT.")


class HcpLoraLayer(SinglePluginLayer, type_name="hcp_lora", block_cls=LoraBlock):
    """The PEFT tuner layer of ``hcp_lora``: wraps a Linear/Conv2d host and runs its :class:`LoraBlock` s."""


class HcpLoraModel(HcpSingleModel, layer_cls=HcpLoraLayer, config_cls=HcpLoraConfig):
    """The PEFT tuner of ``hcp_lora``; defining it registers the type with PEFT."""
