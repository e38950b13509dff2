"""``register_patch_plugin``: turn a ``PatchPluginBlock`` and its config into a PEFT type."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.config import HcpPatchConfig
from peft_hcp.patch.layer import make_container_class
from peft_hcp.patch.model import HcpPatchModel
from peft_hcp.registry import register_tuner

ConfigT = TypeVar("ConfigT", bound=type[HcpPatchConfig])


def register_patch_plugin(type_name: str, block_cls: type[PatchPluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator that makes ``config_cls`` + ``block_cls`` the PEFT type ``type_name``.

    Example::

        @register_patch_plugin("hcp_prelu", PReLUPatch)
        @dataclass
        class HcpPReLUConfig(HcpPatchConfig):
            p: float = 0.2
    """
    if not (isinstance(block_cls, type) and issubclass(block_cls, PatchPluginBlock)):
        raise TypeError(f"{block_cls!r} is not a PatchPluginBlock subclass.")
    if not block_cls.wrapable_classes:
        raise TypeError(f"{block_cls.__name__}.wrapable_classes is empty: say which module types it patches.")

    def decorate(config_cls: ConfigT) -> ConfigT:
        if not issubclass(config_cls, HcpPatchConfig):
            raise TypeError(f"{config_cls.__name__} must subclass HcpPatchConfig.")
        container_cls = make_container_class(type_name, block_cls)
        model_cls = type(
            f"{block_cls.__name__}Model",
            (HcpPatchModel,),
            {
                "prefix": type_name + "_",
                "tuner_layer_cls": container_cls,
                "__module__": block_cls.__module__,
                "__qualname__": f"{block_cls.__qualname__}Model",
            },
        )
        home = sys.modules[block_cls.__module__]  # so pickle and multiprocessing can find the made classes
        setattr(home, container_cls.__name__, container_cls)
        setattr(home, model_cls.__name__, model_cls)
        config_cls.type_name = type_name
        config_cls.plugin_cls = block_cls
        register_tuner(type_name, config_cls, model_cls)
        return config_cls

    return decorate
