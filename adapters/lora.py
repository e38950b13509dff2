"""LoRA as a single-layer plugin on the output route: ``out + up(down(dropout(x))) * scaling``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from peft_hcp.adapters.lowrank import check_rank, host_shape, resolve_rank, scaling
from peft_hcp.lowrank_ops import dropout_down
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.register import register_single_plugin


class LoraBlock(SinglePluginBlock):
    """``lora_down`` (in -> rank, the host's kernel for convolutions), then ``lora_up`` (rank -> out, 1x1)."""

    wrapable_classes = (nn.Linear, nn.Conv2d)
    supports_scaling = True

    def __init__(self, host: nn.Module, config: "HcpLoraConfig") -> None:
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

    def forward(self, fea_in: tuple[torch.Tensor, ...], fea_out: torch.Tensor) -> torch.Tensor:
        x = fea_in[0].to(self.lora_down.weight.dtype)
        return fea_out + (self.lora_up(dropout_down(x, self.lora_down, self.dropout)) * self.scaling).to(fea_out.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scaling

    def get_delta_bias(self) -> Optional[torch.Tensor]:
        return None if self.lora_up.bias is None else self.lora_up.bias * self.scaling


@register_single_plugin("hcp_lora", LoraBlock)
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bias, bool):  # HCP's boolean means a bias on the LoRA path
            self.lora_bias, self.bias = self.lora_bias or self.bias, "none"
        if self.bias not in ("none", "all", "hcp_lora_only"):
            raise ValueError(f"bias must be a bool, 'none', 'all' or 'hcp_lora_only', got {self.bias!r}.")
        check_rank(self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
