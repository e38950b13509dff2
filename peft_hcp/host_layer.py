"""``HostLayer``: the PEFT tuner layer that takes a host module's place and keeps it as ``base_layer``.

Shared by the single-layer wrapper and the patch container: replacing the host (as PEFT's LoRA does)
costs no hook dispatch, lets state dicts, device moves and ``deepcopy`` see the plugins, and lets
``unload`` put the untouched host object back. A registered type binds ``block_cls`` and
``blocks_attr`` (its blocks live in a ``ModuleDict`` of that name, keyed by adapter name).
"""

from __future__ import annotations

from typing import ClassVar

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.adapter_weights import WeightedLayer
from peft_hcp.errors import UnsupportedLayerError

_HOST_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size")


class HostLayer(WeightedLayer, nn.Module, BaseTunerLayer):
    """Holds ``base_layer`` and the per-adapter blocks; subclasses write ``forward`` (and merging)."""

    block_cls: ClassVar[type[nn.Module]]
    blocks_attr: ClassVar[str]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.add_module(self.blocks_attr, nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        host = self.get_base_layer()
        for attr in _HOST_ATTRS:  # PEFT and diffusers read these off tuner layers
            if hasattr(host, attr):
                setattr(self, attr, getattr(host, attr))
        self.update_layer(adapter_name, config)

    @property
    def blocks(self) -> nn.ModuleDict:
        """This layer's plugin blocks, keyed by adapter name."""
        return self._modules[self.blocks_attr]  # type: ignore[return-value]

    def update_layer(self, adapter_name: str, config) -> None:
        host = self.get_base_layer()
        if not isinstance(host, self.block_cls.wrapable_classes):
            raise UnsupportedLayerError(
                f"{self.block_cls.__name__} attaches to "
                f"{'/'.join(c.__name__ for c in self.block_cls.wrapable_classes)} modules, not {type(host).__name__}."
            )
        self.blocks[adapter_name] = self.block_cls(host, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str):
        """PEFT's name for the weight change adapter ``adapter_name`` makes (if it can say)."""
        return self.blocks[adapter_name].get_delta_weight()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_layer!r}, adapters={list(self.blocks)})"
