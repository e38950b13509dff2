"""peft-hcp: HCP-Diffusion's model plugins as PEFT tuner types.

Importing this package registers every bundled plugin type with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know them.
"""

from importlib.metadata import version

from peft_hcp import adapters
from peft_hcp.adapter_set import load_adapter, save_adapter
from peft_hcp.adapters import *  # noqa: F403  (the bundled plugins, registered on import)
from peft_hcp.errors import (
    CheckpointError,
    MergeNotSupportedError,
    SelectorMatchError,
    SelectorSyntaxError,
    UnsupportedLayerError,
)
from peft_hcp.hooked import (
    HcpMultiPluginConfig,
    HcpPluginConfig,
    MultiPluginBlock,
    PluginBlock,
    feed,
    register_multi_plugin,
    register_plugin,
)
from peft_hcp.hotswap import (
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from peft_hcp.hub import push_adapter
from peft_hcp.patch import (
    HcpPatchConfig,
    PatchPluginBlock,
    PatchPluginContainer,
    ReplacePatchContainer,
    register_patch_plugin,
)
from peft_hcp.selectors import (
    Selector,
    Target,
    parse_selector,
    parse_selectors,
    resolve,
)
from peft_hcp.single import HcpSingleConfig, SinglePluginBlock, register_single_plugin
from peft_hcp.single.lowrank import LowRankBlock
from peft_hcp.wrap import wrap_model


__version__ = version("peft-hcp")

__all__ = [
    *adapters.__all__,
    "CheckpointError",
    "HcpMultiPluginConfig",
    "HcpPatchConfig",
    "HcpPluginConfig",
    "HcpSingleConfig",
    "LowRankBlock",
    "MergeNotSupportedError",
    "MultiPluginBlock",
    "PatchPluginBlock",
    "PatchPluginContainer",
    "PluginBlock",
    "ReplacePatchContainer",
    "Selector",
    "SelectorMatchError",
    "SelectorSyntaxError",
    "SinglePluginBlock",
    "Target",
    "UnsupportedLayerError",
    "feed",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "load_adapter",
    "parse_selector",
    "parse_selectors",
    "prepare_model_for_compiled_hotswap",
    "push_adapter",
    "register_multi_plugin",
    "register_patch_plugin",
    "register_plugin",
    "register_single_plugin",
    "resolve",
    "save_adapter",
    "wrap_model",
]
