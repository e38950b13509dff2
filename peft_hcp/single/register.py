"""``register_single_plugin``: turn a ``SinglePluginBlock`` and its config into a PEFT type."""

from __future__ import annotations

from typing import Callable

from peft_hcp.registry import ConfigT, plugin_type_decorator
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.layer import SinglePluginLayer
from peft_hcp.single.model import HcpSingleModel


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
    return plugin_type_decorator(
        type_name,
        block_cls,
        block_base=SinglePluginBlock,
        config_base=HcpSingleConfig,
        layer_base=SinglePluginLayer,
        model_base=HcpSingleModel,
    )
