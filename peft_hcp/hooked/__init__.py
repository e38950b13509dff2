"""Cross-layer plugin kinds: ``PluginBlock`` (from -> to) and ``MultiPluginBlock`` (many -> many), driven by hooks."""

from peft_hcp.hooked.block import ActivationCache, MultiPluginBlock, PluginBlock
from peft_hcp.hooked.config import HcpMultiPluginConfig, HcpPluginConfig
from peft_hcp.hooked.feed import feed
from peft_hcp.hooked.layer import HookedPluginLayer, MultiPluginLayer, PluginLayer
from peft_hcp.hooked.model import HcpHookedModel
from peft_hcp.hooked.register import register_multi_plugin, register_plugin

__all__ = [
    "ActivationCache",
    "HcpHookedModel",
    "HcpMultiPluginConfig",
    "HcpPluginConfig",
    "HookedPluginLayer",
    "MultiPluginBlock",
    "MultiPluginLayer",
    "PluginBlock",
    "PluginLayer",
    "feed",
    "register_multi_plugin",
    "register_plugin",
]
