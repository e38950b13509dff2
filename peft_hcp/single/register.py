"""``register_single_plugin``: turn a ``SinglePluginBlock`` and its config into a PEFT type."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from peft_hcp.registry import register_tuner
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.layer import make_layer_class
from peft_hcp.single.model import HcpSingleModel

ConfigT = TypeVar("ConfigT", bound=type[HcpSingleConfig])


def register_single_plugin(type_name: str, block_cls: type[SinglePluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator that makes ``config_cls`` + ``block_cls`` the PEFT type ``type_name``.

    Example::

        @register_single_plugin("hcp_scale", ScaleBlock)
        @dataclass
        class HcpScaleConfig(HcpSingleConfig):
            init_gain: float = 0.0

    After that, ``get_peft_model(model, HcpScaleConfig(target_modules=[...]))`` works and the adapter
    saves and loads with PEFT's tooling (in a fresh process, once the defining module is imported).
    """
    if not (isinstance(block_cls, type) and issubclass(block_cls, SinglePluginBlock)):
        raise TypeError(f"{block_cls!r} is not a SinglePluginBlock subclass.")
    if not block_cls.wrapable_classes:
        raise TypeError(f"{block_cls.__name__}.wrapable_classes is empty: say which layer types it attaches to.")

    def decorate(config_cls: ConfigT) -> ConfigT:
        if not issubclass(config_cls, HcpSingleConfig):
            raise TypeError(f"{config_cls.__name__} must subclass HcpSingleConfig.")
        layer_cls = make_layer_class(type_name, block_cls)
        model_cls = type(
            f"{block_cls.__name__}Model",
            (HcpSingleModel,),
            {
                "prefix": type_name + "_",
                "tuner_layer_cls": layer_cls,
                "__module__": block_cls.__module__,
                "__qualname__": f"{block_cls.__qualname__}Model",
            },
        )
        home = sys.modules[block_cls.__module__]  # so pickle and multiprocessing can find the made classes
        setattr(home, layer_cls.__name__, layer_cls)
        setattr(home, model_cls.__name__, model_cls)
        config_cls.type_name = type_name
        config_cls.plugin_cls = block_cls
        register_tuner(type_name, config_cls, model_cls)
        return config_cls

    return decorate
