"""Decorators that turn a cross-layer block and its config into a PEFT tuner type."""

from __future__ import annotations

from typing import Callable

from peft_hcp.hooked.block import MultiPluginBlock, PluginBlock
from peft_hcp.hooked.config import HcpMultiPluginConfig, HcpPluginConfig
from peft_hcp.hooked.layer import HookedPluginLayer, MultiPluginLayer, PluginLayer
from peft_hcp.hooked.model import HcpHookedModel
from peft_hcp.registry import ConfigT, plugin_type_decorator


def register_plugin(type_name: str, block_cls: type[PluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator: make ``config_cls`` (an ``HcpPluginConfig``) + ``block_cls`` the PEFT type ``type_name``.

    Example::

        @register_plugin("hcp_skip", SkipBlock)
        @dataclass
        class HcpSkipConfig(HcpPluginConfig):
            pass
    """
    return _registrar(type_name, block_cls, PluginBlock, HcpPluginConfig, PluginLayer)


def register_multi_plugin(type_name: str, block_cls: type[MultiPluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator: make ``config_cls`` (an ``HcpMultiPluginConfig``) + ``block_cls`` the PEFT type ``type_name``."""
    return _registrar(type_name, block_cls, MultiPluginBlock, HcpMultiPluginConfig, MultiPluginLayer)


def _registrar(type_name, block_cls, block_base, config_base, layer_base: type[HookedPluginLayer]):
    return plugin_type_decorator(
        type_name,
        block_cls,
        block_base=block_base,
        config_base=config_base,
        layer_base=layer_base,
        model_base=HcpHookedModel,
        layer_suffix="Container",
    )
