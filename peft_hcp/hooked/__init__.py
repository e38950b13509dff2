"""The two cross-layer kinds, which share one hook-driven container: HCP's ``PluginBlock`` (from one layer
to another: a learned skip) and ``MultiPluginBlock`` (many layers to many: a ControlNet).

``block`` (what a plugin writes), ``config``, ``layer`` (the container on the model root that owns the
blocks and the hooks), ``model`` (the PEFT tuner); ``feed`` is re-exported from :mod:`peft_hcp.base.feed`,
which feeds the plugins of every kind.
"""

from peft_hcp.hooked.block import ActivationCache, MultiPluginBlock, PluginBlock
from peft_hcp.hooked.config import HcpMultiPluginConfig, HcpPluginConfig
from peft_hcp.hooked.feed import feed
from peft_hcp.hooked.layer import HookedPluginLayer, MultiPluginLayer, PluginLayer
from peft_hcp.hooked.model import HcpHookedModel, register_multi_plugin, register_plugin


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
