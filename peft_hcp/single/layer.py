"""``SinglePluginLayer``: the PEFT tuner layer that wraps a host and runs its plugin blocks.

It replaces the host in its parent (see :mod:`peft_hcp.host_layer`); each registered plugin type
gets its own subclass, made by registration.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from peft_hcp.host_layer import HostLayer
from peft_hcp.single.block import SinglePluginBlock


class SinglePluginLayer(HostLayer):
    """Wraps ``base_layer``; runs the active adapters' blocks on its output or on its parameter."""

    block_cls: ClassVar[type[SinglePluginBlock]]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__(base_layer, adapter_name, config)
        self._weights_before_merge: dict[str, torch.Tensor] = {}
        hook_param = self.block_cls.hook_param
        self._param_path = ".".join(["base_layer"] * self._depth() + [hook_param]) if hook_param else None

    def _depth(self) -> int:
        """How many tuner layers sit between this one and the host (0 when it wraps the host)."""
        depth, layer = 0, self.base_layer
        while isinstance(layer, BaseTunerLayer):
            depth, layer = depth + 1, layer.base_layer
        return depth

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
