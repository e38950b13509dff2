"""``SinglePluginBlock``: the base class of a plugin that lives on one host layer.

A block is written as in HCP-Diffusion, and takes one of two routes:

*output route* (``hook_param = None``)
    ``forward(fea_in, fea_out)`` gets the host's inputs as a tuple and its output, and returns the new
    output. LoRA: ``fea_out + up(down(fea_in[0])) * scaling``.
*parameter route* (``hook_param = "weight"``)
    ``forward(host_param)`` gets the host's parameter and returns the one the host computes with.
    LoHa: ``host_param + delta``. On a quantized host (:mod:`peft_hcp.quant.hosts`) it gets the dequantized
    weight, in the host's compute dtype.

``wrapable_classes`` lists the host types the block attaches to; a selector that picks a container
(an attention module, ``''`` for the whole model) attaches to every such layer inside it.

The constructor receives the host layer and the adapter config. A block that can be folded into its
host implements :meth:`get_delta_weight` (and :meth:`get_delta_bias` when it changes the bias), or
:meth:`merged_weight` when the merged weight depends on the host's (DoRA). A block that honours a
per-adapter weight (diffusers' ``set_adapters(names, weights)``) sets ``supports_scaling = True`` and
multiplies its effect by ``self.scaling``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from peft_hcp.base.blocks import HostedBlock
from peft_hcp.errors import MergeNotSupportedError


class SinglePluginBlock(HostedBlock):
    """One adapter on one host layer. Subclass it, set ``wrapable_classes``, write ``forward``."""

    hook_param: ClassVar[Optional[str]] = None

    def get_delta_weight(self) -> torch.Tensor:
        """The change this block makes to the host's weight, when it does not depend on that weight."""
        raise MergeNotSupportedError(
            f"{type(self).__name__} cannot be merged into its host: it computes its effect from activations "
            "and defines no get_delta_weight(). Keep it unmerged, or unload() it."
        )

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The host weight with this block folded in (``weight`` is the host's current one)."""
        return weight + self.get_delta_weight().detach().to(weight.dtype).reshape(weight.shape)

    def get_delta_bias(self) -> Optional[torch.Tensor]:
        """The change this block makes to the host's bias, or ``None``."""
        return None
