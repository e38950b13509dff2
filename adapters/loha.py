"""LoHa as a single-layer plugin on the parameter route: ``W + (A1 B1) * (A2 B2) * ... * scaling``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from peft_hcp.adapters.lowrank import check_rank, host_shape, resolve_rank, scaling
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.register import register_single_plugin


class _HadamardOfLowRanks(torch.autograd.Function):
    """``(a1 @ b1) * (a2 @ b2) * ... * scale`` that saves only the small factors for backward.

    Autograd would keep every full-size product ``ai @ bi`` alive until backward (one weight-sized
    tensor per group and layer); recomputing them there keeps a LoHa's training memory at LoRA's level.
    """

    @staticmethod
    def forward(ctx, scale: float, *factors: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(*factors)
        return _hadamard(factors) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        factors = ctx.saved_tensors
        grad = grad * ctx.scale
        grads = []
        for index in range(0, len(factors), 2):
            others = factors[:index] + factors[index + 2 :]
            outer = grad * _hadamard(others) if others else grad
            a, b = factors[index], factors[index + 1]
            grads += [outer @ b.T, a.T @ outer]
        return (None, *grads)


def _hadamard(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The elementwise product of ``factors[0] @ factors[1]``, ``factors[2] @ factors[3]``, ..."""
    product = factors[0] @ factors[1]
    for index in range(2, len(factors), 2):
        product = product * (factors[index] @ factors[index + 1])
    return product


class LohaBlock(SinglePluginBlock):
    """The Hadamard product of ``rank_groups`` low-rank pairs ``hada_wN_a @ hada_wN_b``, added to the weight.

    Weights are named as LyCORIS/kohya name them (``hada_w1_a`` ...). The host computes with the new
    weight in one pass, instead of a second matmul on the activations.
    """

    wrapable_classes = (nn.Linear, nn.Conv2d)
    hook_param = "weight"
    supports_scaling = True

    def __init__(self, host: nn.Module, config: "HcpLohaConfig") -> None:
        super().__init__(host, config)
        _, out_features = host_shape(host)
        fan_in = host.weight[0].numel()
        self.rank = resolve_rank(config.r, out_features)
        self.rank_groups = config.rank_groups
        for index in range(1, self.rank_groups + 1):
            self.register_parameter(f"hada_w{index}_a", nn.Parameter(torch.empty(out_features, self.rank)))
            self.register_parameter(f"hada_w{index}_b", nn.Parameter(torch.empty(self.rank, fan_in)))
        for param in self.parameters():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if config.init_weights:  # as PEFT's LoHa: one factor starts at zero, so the product does
            nn.init.zeros_(getattr(self, f"hada_w{self.rank_groups}_b"))
        self.base_scaling = self.scaling = scaling(config.alpha, self.rank, config.alpha_auto_scale)

    def forward(self, host_param: torch.Tensor) -> torch.Tensor:
        return host_param + self.get_delta_weight().reshape(host_param.shape).to(host_param.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        factors = []
        for index in range(1, self.rank_groups + 1):
            factors += [getattr(self, f"hada_w{index}_a"), getattr(self, f"hada_w{index}_b")]
        return _HadamardOfLowRanks.apply(self.scaling, *factors)


@register_single_plugin("hcp_loha", LohaBlock)
@dataclass
class HcpLohaConfig(HcpSingleConfig):
    """LoHa on ``nn.Linear`` / ``nn.Conv2d`` layers: ``rank_groups`` low-rank pairs multiplied elementwise."""

    r: Union[int, float] = field(default=4, metadata={"help": "Rank of each pair, or a ratio of the output features."})
    alpha: float = field(default=1.0, metadata={"help": "Strength; divided by the rank when alpha_auto_scale."})
    alpha_auto_scale: bool = field(default=True, metadata={"help": "Scale by alpha / rank instead of alpha."})
    rank_groups: int = field(default=2, metadata={"help": "How many low-rank pairs are multiplied (2 = LoHa)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.r)
        if isinstance(self.rank_groups, bool) or not isinstance(self.rank_groups, int) or self.rank_groups < 1:
            raise ValueError(f"rank_groups must be a positive int, got {self.rank_groups!r}.")
