"""``SinglePluginLayer``: the PEFT tuner layer that wraps a host and runs its plugin blocks.

It replaces the host in its parent (see :mod:`peft_hcp.base.host_layer`). A plugin type has its own
subclass, which names the type and the block: ``class HcpLoraLayer(SinglePluginLayer, type_name="hcp_lora",
block_cls=LoraBlock)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, cast

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from peft_hcp.base.host_layer import HostLayer
from peft_hcp.base.unwrap import tuner_layers
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig


def broken_adapter_error(adapter_name: str) -> ValueError:
    """PEFT's error for a merge that would put NaNs or infs into the weights (code downstream matches on it)."""
    return ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")


class SinglePluginLayer(HostLayer):
    """Wraps ``base_layer``; runs the active adapters' blocks on its output or on its parameter."""

    block_base: ClassVar[type] = SinglePluginBlock
    config_base: ClassVar[type] = HcpSingleConfig
    block_cls: ClassVar[type[SinglePluginBlock]]
    snapshot_attrs: ClassVar[tuple[str, ...]] = ("_weights_before_merge",)

    def _block(self, adapter_name: str) -> SinglePluginBlock:
        return cast(SinglePluginBlock, self.blocks[adapter_name])

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__(base_layer, adapter_name, config)
        self._weights_before_merge: dict[str, torch.Tensor] = {}
        hook_param = self.block_cls.hook_param
        # the host's parameter, through the tuner layers between this one and the host
        depth = len(tuner_layers(self.base_layer))
        self._param_path = ".".join(["base_layer"] * depth + [hook_param]) if hook_param else None

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
        host_param = getattr(self.get_base_layer(), cast(str, self.block_cls.hook_param))
        param = host_param
        for block in active:
            param = block(param)
        return self._forward_with_param(self._param_path, param.to(host_param.dtype), x, args, kwargs)

    def _forward_with_param(self, path: str, param: torch.Tensor, x: Any, args: tuple, kwargs: dict) -> Any:
        """Run the host with ``param`` in place of its hooked parameter (at ``path`` from this layer). The direct
        ``F.linear`` / conv call skips the host's own hooks, so it is taken only for a host without any (a
        cross-layer plugin reading or changing that layer has put its hooks there)."""
        base = self.base_layer
        hooked = base._forward_hooks or base._forward_pre_hooks
        if path == "weight" and not args and not kwargs and not hooked:
            if type(base) is nn.Linear:
                return F.linear(x, param, base.bias)
            if type(base) is nn.Conv2d:
                return base._conv_forward(x, param, base.bias)
        return torch.func.functional_call(base, {path: param}, (x, *args), kwargs)

    # -- merging -------------------------------------------------------------------------------

    def merged_params(self, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """The host's weight (and bias) with ``adapter_names`` folded in, in order; the host is not changed."""
        host = self.get_base_layer()
        params: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in adapter_names:
                block = self._block(name)
                weight_name = block.hook_param or "weight"
                weight = params.get(weight_name, getattr(host, weight_name).data)
                params[weight_name] = block.merged_weight(weight).to(weight.dtype)
                bias_delta = block.get_delta_bias()
                if bias_delta is not None:
                    host_bias = getattr(host, "bias", None)
                    if not isinstance(host_bias, torch.Tensor):
                        raise ValueError(f"{type(block).__name__} has a bias but its host has none to merge it into.")
                    params["bias"] = params.get("bias", host_bias.data) + bias_delta.detach().to(host_bias.dtype)
        return params

    def adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        return [name for name in check_adapters_to_merge(self, adapter_names) if name in self.blocks]

    def check_merge(self, adapter_names: Optional[list[str]]) -> None:
        """Raise PEFT's broken-adapter error, naming the adapter, if merging would give a non-finite value."""
        names = self.adapters_to_merge(adapter_names)
        for count, name in enumerate(names, start=1):
            if not all(torch.isfinite(value).all() for value in self.merged_params(names[:count]).values()):
                raise broken_adapter_error(name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the blocks into the host's weight (and bias).

        The host's values before the first merge are kept until :meth:`unmerge`, which puts them back
        exactly: merge-then-unmerge leaves no rounding error in the base model. With ``safe_merge`` nothing
        changes when a merged value would not be finite.
        """
        if safe_merge:
            self.check_merge(adapter_names)
        names = self.adapters_to_merge(adapter_names)
        params = self.merged_params(names)
        host = self.get_base_layer()
        for param_name, value in params.items():
            data = getattr(host, param_name).data
            self._weights_before_merge.setdefault(param_name, data.clone())
            data.copy_(value)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        host = self.get_base_layer()
        for param_name, original in self._weights_before_merge.items():
            getattr(host, param_name).data.copy_(original)
        self._weights_before_merge.clear()
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """PEFT's name for the weight change adapter ``adapter_name`` makes."""
        block = self._block(adapter_name)
        weight = getattr(self.get_base_layer(), block.hook_param or "weight").data
        return block.merged_weight(weight) - weight
