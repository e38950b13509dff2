"""``register_patch_plugin``: turn a ``PatchPluginBlock`` and its config into a PEFT type."""

from __future__ import annotations

from typing import Callable

from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.config import HcpPatchConfig
from peft_hcp.patch.layer import PatchPluginContainer
from peft_hcp.patch.model import HcpPatchModel
from peft_hcp.registry import ConfigT, plugin_type_decorator


def register_patch_plugin(type_name: str, block_cls: type[PatchPluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator that makes ``config_cls`` + ``block_cls`` the PEFT type ``type_name``.

    The container is ``block_cls.container_cls`` (default :class:`PatchPluginContainer`). Example::

        @register_patch_plugin("hcp_prelu", PReLUPatch)
        @dataclass
        class HcpPReLUConfig(HcpPatchConfig):
            p: float = 0.2
    """
    container = getattr(block_cls, "container_cls", None) or PatchPluginContainer
    if not (isinstance(container, type) and issubclass(container, PatchPluginContainer)):
        raise TypeError(f"{block_cls!r}.container_cls must subclass PatchPluginContainer, got {container!r}.")
    return plugin_type_decorator(
        type_name,
        block_cls,
        block_base=PatchPluginBlock,
        config_base=HcpPatchConfig,
        layer_base=container,
        model_base=HcpPatchModel,
        layer_suffix="Container",
    )
