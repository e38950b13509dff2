"""LoHa as a single-layer plugin on the parameter route: ``W + (A1 B1) * (A2 B2) * ... * scaling``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from peft_hcp.quant.hosts import weight_shape
from peft_hcp.single import HcpSingleConfig, HcpSingleModel, SinglePluginLayer
from peft_hcp.single.lowrank import (
    LowRankBlock,
    check_rank,
    host_shape,
    resolve_rank,
    scaling,
)


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


class LohaBlock(LowRankBlock):
    """The Hadamard product of ``rank_groups`` low-rank pairs ``hada_wN_a @ hada_wN_b``, added to the weight.

    Weights are named as LyCORIS/kohya name them (``hada_w1_a`` ...). The host computes with the new
    weight in one pass, instead of a second matmul on the activations.
    """

    hook_param = "weight"
    kohya_weights = kohya_required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank_dims = {"hada_w1_a": 1, "hada_w1_b": 0, "hada_w2_a": 1, "hada_w2_b": 0}
    scale_weight = "hada_w1_a"

    def __init__(self, host: nn.Module, config: HcpLohaConfig) -> None:
        super().__init__(host, config)
        _, out_features = host_shape(host)
        fan_in = weight_shape(host)[1:].numel()  # the logical shape: a quantized weight's storage differs
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

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        if self.rank_groups != 2:
            raise ValueError(f"kohya/LyCORIS LoHa files have two pairs; this block has {self.rank_groups}.")
        return super().kohya_tensors()

    def lora_factors(self, host: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA of rank ``r * r`` equal to this block: ``(A1 B1) * (A2 B2) = (A1 ⊙ A2)(B1 ⊙ B2)``, with
        column-wise / row-wise Khatri-Rao products."""
        if self.rank_groups != 2:
            raise ValueError(f"Only two-pair LoHa blocks convert to LoRA; this one has {self.rank_groups}.")
        with torch.no_grad():
            a1, b1, a2, b2 = self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b
            up = (a1[:, :, None] * a2[:, None, :]).flatten(1) * self.scaling  # (out, r*r)
            down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # (r*r, fan_in)
        if isinstance(host, nn.Conv2d):
            return down.reshape(down.shape[0], *weight_shape(host)[1:]), up[:, :, None, None]
        return down, up


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


class HcpLohaLayer(SinglePluginLayer, type_name="hcp_loha", block_cls=LohaBlock):
    """The PEFT tuner layer of ``hcp_loha``: wraps a Linear/Conv2d host, which computes with ``W + ΔW``."""


class HcpLohaModel(HcpSingleModel, layer_cls=HcpLohaLayer, config_cls=HcpLohaConfig):
    """The PEFT tuner of ``hcp_loha``; defining it registers the type with PEFT."""
