"""``SinglePluginBlock``: the base class of a plugin that lives on one host layer.

A block is written as in HCP-Diffusion, and takes one of two routes:

*output route* (``hook_param = None``)
    ``forward(fea_in, fea_out)`` gets the host's inputs as a tuple and its output, and returns the new
    output. LoRA: ``fea_out + up(down(fea_in[0])) * scaling``.
*parameter route* (``hook_param = "weight"``)
    ``forward(host_param)`` gets the host's parameter and returns the one the host computes with.
    LoHa: ``host_param + delta``.

``wrapable_classes`` lists the host types the block attaches to; a selector that picks a container
(an attention module, ``''`` for the whole model) attaches to every such layer inside it.

The constructor receives the host layer and the adapter config. Blocks that can be folded into the
host's weights implement :meth:`get_delta_weight` (and :meth:`get_delta_bias` when they change the
bias); blocks that honour a per-adapter weight (diffusers' ``set_adapters(names, weights)``) set
``supports_scaling = True`` and multiply their effect by ``self.scaling``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from peft_hcp.adapter_weights import WeightedBlock
from peft_hcp.errors import MergeNotSupportedError


class SinglePluginBlock(WeightedBlock, nn.Module):
    """One adapter on one host layer. Subclass it, set ``wrapable_classes``, write ``forward``."""

    wrapable_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    hook_param: ClassVar[Optional[str]] = None

    def __init__(self, host: nn.Module, config) -> None:
        super().__init__()

    def get_delta_weight(self) -> torch.Tensor:
        """The change this block makes to the host's weight, independent of that weight's value."""
        raise MergeNotSupportedError(
            f"{type(self).__name__} cannot be merged into its host: it computes its effect from activations "
            "and defines no get_delta_weight(). Keep it unmerged, or unload() it."
        )

    def get_delta_bias(self) -> Optional[torch.Tensor]:
        """The change this block makes to the host's bias, or ``None``."""
        return None
