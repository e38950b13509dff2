"""``HcpPatchModel``: the PEFT tuner (``BaseTuner``) of patch plugins.

Host resolution, adapter bookkeeping, strict loading, delete and unload are those of the single-layer
kind (:class:`~peft_hcp.single.model.HcpSingleModel`): a container, like a single-layer wrapper, is a
tuner layer with ``base_layer`` and a ``blocks`` dict. What differs: patches are never merged, and a
patched module may have no parameters (an activation), which PEFT's ``_replace_module`` assumes away.
"""

from __future__ import annotations

from torch import nn

from peft_hcp.errors import MergeNotSupportedError
from peft_hcp.patch.layer import PatchPluginContainer
from peft_hcp.single.model import HcpSingleModel


class HcpPatchModel(HcpSingleModel):
    """Attaches one patch type; a subclass per type is made by registration."""

    tuner_layer_cls: type[PatchPluginContainer]

    def _check_merge_allowed(self) -> None:
        raise MergeNotSupportedError(
            f"{self.tuner_layer_cls.block_cls.__name__} patches cannot be merged: a patch changes how a module "
            "computes (it may replace the module outright), which no weight of the original module can express. "
            "Keep the patches, or unload() them to get the original model back."
        )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # the container already moved its patch to the device of the host's weights, if it has any
        setattr(parent, child_name, new_module)
