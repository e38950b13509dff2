"""peft-hcp: HCP-Diffusion's model plugins as PEFT tuner types.

Importing this package registers every bundled plugin type with PEFT, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know them.
"""

__version__ = "0.1.0"

from peft_hcp.adapters.loha import HcpLohaConfig, LohaBlock
from peft_hcp.adapters.lora import HcpLoraConfig, LoraBlock
from peft_hcp.adapters.prelu import HcpPReLUConfig, PReLUPatch
from peft_hcp.adapters.skip import HcpSkipConfig, SkipBlock
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
from peft_hcp.hub import load_adapter, push_adapter, save_adapter
from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.config import HcpPatchConfig
from peft_hcp.patch.layer import PatchPluginContainer, ReplacePatchContainer
from peft_hcp.patch.register import register_patch_plugin
from peft_hcp.selectors import Selector, Target, parse_selector, parse_selectors, resolve
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.register import register_single_plugin
from peft_hcp.wrap import wrap_model
# the ControlNet plugins import the core names above from this package, so they come last
from peft_hcp.adapters.controlnet import ControlNetPlugin, HcpControlNetConfig
from peft_hcp.adapters.controlnet_dit import HcpFluxControlNetConfig, HcpSD3ControlNetConfig

__all__ = [
    "load_adapter",
    "push_adapter",
    "save_adapter",
    "ControlNetPlugin",
    "HcpControlNetConfig",
    "HcpFluxControlNetConfig",
    "HcpSD3ControlNetConfig",
    "HcpMultiPluginConfig",
    "HcpPluginConfig",
    "HcpSkipConfig",
    "MultiPluginBlock",
    "PluginBlock",
    "SkipBlock",
    "feed",
    "register_multi_plugin",
    "register_plugin",
    "CheckpointError",
    "HcpLohaConfig",
    "HcpLoraConfig",
    "HcpPReLUConfig",
    "HcpPatchConfig",
    "HcpSingleConfig",
    "LohaBlock",
    "LoraBlock",
    "MergeNotSupportedError",
    "PReLUPatch",
    "PatchPluginBlock",
    "PatchPluginContainer",
    "ReplacePatchContainer",
    "Selector",
    "SelectorMatchError",
    "SelectorSyntaxError",
    "SinglePluginBlock",
    "Target",
    "UnsupportedLayerError",
    "parse_selector",
    "parse_selectors",
    "register_patch_plugin",
    "register_single_plugin",
    "resolve",
    "wrap_model",
]
