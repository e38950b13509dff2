"""The single-layer kind (HCP's ``SinglePluginBlock``): a plugin on one host layer, which it wraps.

``block`` (what a plugin writes), ``config`` (its fields), ``layer`` (the PEFT tuner layer that replaces
the host), ``model`` (the PEFT tuner), ``lowrank`` (the interface of the LoRA family).
"""

from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.layer import SinglePluginLayer
from peft_hcp.single.model import HcpSingleModel, find_hosts, register_single_plugin


__all__ = [
    "HcpSingleConfig",
    "HcpSingleModel",
    "SinglePluginBlock",
    "SinglePluginLayer",
    "find_hosts",
    "register_single_plugin",
]
