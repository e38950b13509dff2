"""The patch kind (HCP's ``PatchPluginBlock``): a container takes a module's place and runs patches around it.

``block`` (what a patch writes), ``config``, ``layer`` (the containers: chaining or replacing), ``model``
(the PEFT tuner).
"""

from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.config import HcpPatchConfig
from peft_hcp.patch.layer import PatchPluginContainer, ReplacePatchContainer
from peft_hcp.patch.model import HcpPatchModel, register_patch_plugin


__all__ = [
    "HcpPatchConfig",
    "HcpPatchModel",
    "PatchPluginBlock",
    "PatchPluginContainer",
    "ReplacePatchContainer",
    "register_patch_plugin",
]
