"""The seed's patch example: replace SiLU activations by learnable PReLUs.

``HcpPReLUConfig(target_modules=["re:.*nonlinearity$"])`` patches the ResNet activations of a
diffusers UNet; ``target_modules=[""]`` patches every ``nn.SiLU`` of the model (``wrap_model``).

The container is replacing (:class:`~peft_hcp.patch.layer.ReplacePatchContainer`): the SiLU does not
run, and each active PReLU adapter contributes ``PReLU(x)``. With one active adapter the activation
*is* that PReLU; with several active at once their outputs are **summed** (HCP-Diffusion's rule), so
two adapters give ``PReLU_a(x) + PReLU_b(x)``. ``disable_adapter()`` brings back the SiLU exactly.
A PReLU is not a no-op at init: ``init_weights=True`` starts every slope at ``p`` (HCP's default 0.2);
``init_weights=False`` draws slopes uniformly from [0, 1) (for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peft_hcp.patch import (
    HcpPatchConfig,
    HcpPatchModel,
    PatchPluginBlock,
    ReplacePatchContainer,
)


class PReLUPatch(PatchPluginBlock):
    """A ``nn.PReLU`` (one slope) in place of the patched SiLU."""

    wrapable_classes = (nn.SiLU,)
    container_cls = ReplacePatchContainer

    def __init__(self, host: nn.Module, config: HcpPReLUConfig) -> None:
        super().__init__(host, config)
        self.act = nn.PReLU(num_parameters=1, init=config.p)
        if not config.init_weights:
            nn.init.uniform_(self.act.weight, 0.0, 1.0)

    def post_forward(self, output, x: torch.Tensor) -> torch.Tensor:
        return output + self.act(x)


@dataclass
class HcpPReLUConfig(HcpPatchConfig):
    """SiLU -> PReLU on the selected activations (``p`` is the initial negative slope)."""

    p: float = field(default=0.2, metadata={"help": "Initial slope of the negative part (nn.PReLU's init)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)):
            raise ValueError(f"p must be a number, got {self.p!r}.")


class HcpPReLUContainer(ReplacePatchContainer, type_name="hcp_prelu", block_cls=PReLUPatch):
    """The container that takes a SiLU's place: the sum of the active adapters' PReLUs."""


class HcpPReLUModel(HcpPatchModel, layer_cls=HcpPReLUContainer, config_cls=HcpPReLUConfig):
    """The PEFT tuner of ``hcp_prelu``; defining it registers the type with PEFT."""
