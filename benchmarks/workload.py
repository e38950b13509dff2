"""The model and inputs every pair runs on: one base UNet, built once, shared by both sides."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from benchmarks.measure import saved_for_backward
from peft_hcp.embedded import sd15_unet, tiny_unet


TEXT_TOKENS = 77
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# attention projections, feed-forward and ResNet convolutions: what a typical SD LoRA trains
TRAIN_TARGETS = r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|resnets\.\d+\.conv[12])"


@dataclass
class Workload:
    device: torch.device
    dtype: torch.dtype
    resolution: int
    batch: int
    model: str = "sd15"
    seed: int = 0

    @cached_property
    def base(self) -> UNet2DConditionModel:
        """The bare base model (frozen); adapted sides get :meth:`twin` or :meth:`copy` of it."""
        build = sd15_unet if self.model == "sd15" else tiny_unet
        return build(self.seed).to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def twin(self) -> UNet2DConditionModel:
        """A second model object on the *same* weight storage: frozen sides cost no extra memory."""
        base = self.base
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(base.config)
        model.load_state_dict(base.state_dict(), assign=True)
        return model.eval().requires_grad_(False)

    def copy(self) -> UNet2DConditionModel:
        """A model with its own copy of the weights (for sides that change them, e.g. merging)."""
        return copy.deepcopy(self.base)

    @cached_property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        config = self.base.config
        sample = torch.randn(self.batch, config.in_channels, self.resolution, self.resolution, generator=generator)
        timestep = torch.randint(0, 1000, (self.batch,), generator=generator)
        text = torch.randn(self.batch, TEXT_TOKENS, config.cross_attention_dim, generator=generator)
        return sample.to(self.device, self.dtype), timestep.to(self.device), text.to(self.device, self.dtype)

    def linear_and_conv_names(self) -> list[str]:
        return [n for n, m in self.base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def infer(self, model: nn.Module, **kwargs) -> callable:
        sample, timestep, text = self.inputs

        def step() -> torch.Tensor:
            with torch.no_grad():
                return model(sample, timestep, encoder_hidden_states=text, **kwargs).sample

        return step

    def train(self, model: nn.Module, forward: Optional[Callable[[], torch.Tensor]] = None) -> TrainStep:
        """One optimiser step (forward, backward, AdamW) on ``model``'s trainable parameters."""
        sample, timestep, text = self.inputs
        target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(sample)
        forward = forward or (lambda: model(sample, timestep, encoder_hidden_states=text).sample)
        return TrainStep(model, forward, target, weights=(model, self.base))


class TrainStep:
    """A training step, callable; :meth:`saved_bytes` is what its forward keeps for backward."""

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[], torch.Tensor],
        target: torch.Tensor,
        weights: tuple[nn.Module, ...],
    ) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(model).__name__} has nothing to train.")
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.forward, self.target, self.weights = forward, target, weights
        model.train()

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.forward().float(), self.target.float())

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def saved_bytes(self) -> int:
        """Activation bytes the forward saves for backward (weights and buffers excluded; exact)."""
        weights = [t for module in self.weights for t in (*module.parameters(), *module.buffers())]
        return saved_for_backward(self.loss, weights)
