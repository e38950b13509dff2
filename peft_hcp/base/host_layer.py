"""``HostLayer``: the PEFT tuner layer that takes a host module's place and keeps it as ``base_layer``.

Shared by the single-layer wrapper and the patch container: replacing the host (as PEFT's LoRA does)
costs no hook dispatch, lets state dicts, device moves and ``deepcopy`` see the plugins, and lets
``unload`` put the untouched host object back.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from peft_hcp.base.blocks import BlockLayer, HostedBlock
from peft_hcp.base.config import HcpConfig
from peft_hcp.errors import UnsupportedLayerError
from peft_hcp.quant.hosts import quantization_of


#: host attributes PEFT and diffusers read off tuner layers; convolutions also get PEFT's
#: ``in_features`` / ``out_features`` (their channel counts), as PEFT's own Conv layers have them.
_HOST_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size")


class HostLayer(BlockLayer):
    """Holds ``base_layer`` and the per-adapter blocks; subclasses write ``forward`` (and merging)."""

    block_cls: ClassVar[type[HostedBlock]]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HcpConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        host = self.get_base_layer()
        for attr in _HOST_ATTRS:
            if hasattr(host, attr):
                setattr(self, attr, getattr(host, attr))
        if hasattr(host, "in_channels") and not hasattr(host, "in_features"):
            self.in_features, self.out_features = host.in_channels, host.out_channels
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: HcpConfig) -> None:
        host = self.get_base_layer()
        if not isinstance(host, self.block_cls.wrapable_classes):
            raise UnsupportedLayerError(
                f"{self.block_cls.__name__} attaches to "
                f"{'/'.join(c.__name__ for c in self.block_cls.wrapable_classes)} modules, not {type(host).__name__}."
            )
        block = self.block_cls(host, config)
        block.adapter_name = adapter_name
        self.blocks[adapter_name] = block
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        """PEFT's device and dtype for the adapters (it casts them there), the dtype a quantized host computes in
        rather than its storage's: an fp8-stored layer's adapters stay in its compute dtype."""
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        quantized = quantization_of(base_layer)
        return device, dtype if quantized is None else quantized.compute_dtype(base_layer)

    def remove_from(self, model: nn.Module, name: str) -> None:
        """Put the module this layer wrapped back in its place."""
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, self.base_layer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_layer!r}, adapters={list(self.blocks)})"
