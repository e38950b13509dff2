"""Adapter weights: diffusers' ``set_adapters(names, weights)`` and a pipeline's LoRA scale.

diffusers calls ``set_scale(adapter, weight)`` on every tuner layer for ``set_adapters``, and
``scale_layer`` / ``unscale_layer`` around a pipeline call given a LoRA scale. A block that can weight
its effect sets ``supports_scaling`` and multiplies by ``self.scaling``; one that cannot refuses an
explicit weight other than 1.0, and is skipped by a pipeline-wide LoRA scale (which is meant for the
LoRA-like adapters beside it).
"""

from __future__ import annotations

from typing import ClassVar, Optional


class WeightedBlock:
    """Mixin for plugin blocks: ``scaling`` is ``base_scaling`` (the trained strength) times the weight."""

    supports_scaling: ClassVar[bool] = False
    base_scaling: float = 1.0
    scaling: float = 1.0

    def set_scale(self, scale: float) -> None:
        """Weight this block's effect by ``scale`` relative to its trained strength."""
        if not self.supports_scaling:
            if scale != 1.0:
                raise ValueError(f"{type(self).__name__} does not support adapter weights other than 1.0.")
            return
        self.scaling = self.base_scaling * float(scale)


class WeightedLayer:
    """Mixin for tuner layers: route the weight calls to the blocks of each adapter (``blocks``)."""

    def _blocks_of(self, adapter_name: str) -> list[WeightedBlock]:
        return [self.blocks[adapter_name]] if adapter_name in self.blocks else []

    def set_scale(self, adapter: str, scale: float) -> None:
        for block in self._blocks_of(adapter):
            block.set_scale(scale)

    def scale_layer(self, scale: float) -> None:
        for block in self._scalable_active_blocks():
            block.set_scale(block.scaling / block.base_scaling * scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for block in self._scalable_active_blocks():
            block.set_scale(1.0 if scale is None else block.scaling / block.base_scaling / scale)

    def _scalable_active_blocks(self) -> list[WeightedBlock]:
        return [b for name in self.active_adapters for b in self._blocks_of(name) if b.supports_scaling]
