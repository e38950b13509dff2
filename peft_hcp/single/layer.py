"""``SinglePluginLayer``: the PEFT tuner layer that wraps a host and runs its plugin blocks.

The wrapper replaces the host in its parent (as PEFT's LoRA does), so a plugin costs no hook
dispatch, state dicts and ``deepcopy`` see it, and ``unload`` puts the untouched host back.
Each registered plugin type gets its own subclass (see :func:`make_layer_class`) whose blocks live in
a ``ModuleDict`` named ``<type>_blocks``, keyed by adapter name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from peft_hcp.single.block import SinglePluginBlock


class SinglePluginLayer(nn.Module, BaseTunerLayer):
    """Wraps ``base_layer``; runs the active adapters' blocks on its output or on its parameter."""

    block_cls: ClassVar[type[SinglePluginBlock]]
    blocks_attr: ClassVar[str]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.add_module(self.blocks_attr, nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._weights_before_merge: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self._active_adapter = adapter_name
        host = self.get_base_layer()
        for attr in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size"):
            if hasattr(host, attr):
                setattr(self, attr, getattr(host, attr))
        hook_param = self.block_cls.hook_param
        self._param_path = ".".join(["base_layer"] * self._depth() + [hook_param]) if hook_param else None
        self.update_layer(adapter_name, config)

    def _depth(self) -> int:
        """How many tuner layers sit between this one and the host (0 when it wraps the host)."""
        depth, layer = 0, self.base_layer
        while isinstance(layer, BaseTunerLayer):
            depth, layer = depth + 1, layer.base_layer
        return depth

    @property
    def blocks(self) -> nn.ModuleDict:
        return self._modules[self.blocks_attr]  # type: ignore[return-value]

    def update_layer(self, adapter_name: str, config) -> None:
        self.blocks[adapter_name] = self.block_cls(self.get_base_layer(), config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        blocks = self.blocks
        active = [blocks[name] for name in self.active_adapters if name in blocks]
        if self._param_path is None:
            out = self.base_layer(x, *args, **kwargs)
            if active:
                fea_in = (x, *args)
                for block in active:
                    out = block(fea_in, out)
            return out
        if not active:
            return self.base_layer(x, *args, **kwargs)
        host_param = getattr(self.get_base_layer(), self.block_cls.hook_param)
        param = host_param
        for block in active:
            param = block(param)
        return self._forward_with_param(param.to(host_param.dtype), x, args, kwargs)

    def _forward_with_param(self, param: torch.Tensor, x: Any, args: tuple, kwargs: dict) -> Any:
        """Run the host with ``param`` in place of its hooked parameter."""
        base = self.base_layer
        if self._param_path == "weight" and not args and not kwargs:
            if type(base) is nn.Linear:
                return F.linear(x, param, base.bias)
            if type(base) is nn.Conv2d:
                return base._conv_forward(x, param, base.bias)
        return torch.func.functional_call(base, {self._param_path: param}, (x, *args), kwargs)

    # -- merging -------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the blocks' deltas into the host's weight (and bias).

        The host's values before the first merge are kept until :meth:`unmerge`, which puts them back
        exactly: merge-then-unmerge leaves no rounding error in the base model.
        """
        host = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.blocks:
                continue
            deltas = self._deltas(self.blocks[name], host)
            if safe_merge:
                for param_name, delta in deltas.items():
                    if not torch.isfinite(getattr(host, param_name).data + delta).all():
                        raise ValueError(f"NaNs or infs detected while merging adapter {name!r}; not merged.")
            for param_name, delta in deltas.items():
                data = getattr(host, param_name).data
                self._weights_before_merge.setdefault(param_name, data.clone())
                data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        host = self.get_base_layer()
        for param_name, original in self._weights_before_merge.items():
            getattr(host, param_name).data.copy_(original)
        self._weights_before_merge.clear()
        self.merged_adapters.clear()

    @staticmethod
    def _deltas(block: SinglePluginBlock, host: nn.Module) -> dict[str, torch.Tensor]:
        merge_param = block.hook_param or "weight"
        weight = getattr(host, merge_param)
        deltas = {merge_param: block.get_delta_weight().detach().to(weight.dtype).reshape(weight.shape)}
        bias_delta = block.get_delta_bias()
        if bias_delta is not None:
            if getattr(host, "bias", None) is None:
                raise ValueError(f"{type(block).__name__} has a bias but its host has none to merge it into.")
            deltas["bias"] = bias_delta.detach().to(host.bias.dtype)
        return deltas

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """PEFT's name for the weight change adapter ``adapter_name`` makes."""
        return self.blocks[adapter_name].get_delta_weight()

    # -- adapter weights (diffusers' set_adapters) ---------------------------------------------

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.blocks:
            self.blocks[adapter].set_scale(scale)

    def scale_layer(self, scale: float) -> None:
        for name in self.active_adapters:
            if name in self.blocks:
                block = self.blocks[name]
                block.set_scale(block.scaling / block.base_scaling * scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            if name in self.blocks:
                block = self.blocks[name]
                block.set_scale(1.0 if scale is None else block.scaling / block.base_scaling / scale)

    def __repr__(self) -> str:
        return f"{self.block_cls.__name__}Layer({self.base_layer!r}, adapters={list(self.blocks)})"


def make_layer_class(type_name: str, block_cls: type[SinglePluginBlock]) -> type[SinglePluginLayer]:
    """The tuner-layer class of one plugin type: ``SinglePluginLayer`` bound to ``block_cls``."""
    blocks_attr = f"{type_name}_blocks"
    return type(
        f"{block_cls.__name__}Layer",
        (SinglePluginLayer,),
        {
            "block_cls": block_cls,
            "blocks_attr": blocks_attr,
            "adapter_layer_names": (blocks_attr,),
            "__module__": block_cls.__module__,
            "__qualname__": f"{block_cls.__qualname__}Layer",
        },
    )
