"""Decorators that turn a cross-layer block and its config into a PEFT tuner type."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from peft_hcp.hooked.block import MultiPluginBlock, PluginBlock
from peft_hcp.hooked.config import HcpMultiPluginConfig, HcpPluginConfig
from peft_hcp.hooked.layer import HookedPluginLayer, MultiPluginLayer, PluginLayer
from peft_hcp.hooked.model import HcpHookedModel
from peft_hcp.registry import register_tuner

ConfigT = TypeVar("ConfigT", bound=type)


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
    if not (isinstance(block_cls, type) and issubclass(block_cls, block_base)):
        raise TypeError(f"{block_cls!r} is not a {block_base.__name__} subclass.")

    def decorate(config_cls: ConfigT) -> ConfigT:
        if not issubclass(config_cls, config_base):
            raise TypeError(f"{config_cls.__name__} must subclass {config_base.__name__}.")
        blocks_attr = f"{type_name}_blocks"
        home = sys.modules[block_cls.__module__]  # so pickle and multiprocessing find the made classes
        layer_cls = type(
            f"{block_cls.__name__}Container",
            (layer_base,),
            {
                "block_cls": block_cls,
                "blocks_attr": blocks_attr,
                "adapter_layer_names": (blocks_attr,),
                "__module__": block_cls.__module__,
                "__qualname__": f"{block_cls.__qualname__}Container",
            },
        )
        model_cls = type(
            f"{block_cls.__name__}Model",
            (HcpHookedModel,),
            {
                "prefix": type_name + "_",
                "tuner_layer_cls": layer_cls,
                "__module__": block_cls.__module__,
                "__qualname__": f"{block_cls.__qualname__}Model",
            },
        )
        setattr(home, layer_cls.__name__, layer_cls)
        setattr(home, model_cls.__name__, model_cls)
        config_cls.type_name = type_name
        config_cls.plugin_cls = block_cls
        register_tuner(type_name, config_cls, model_cls)
        return config_cls

    return decorate
