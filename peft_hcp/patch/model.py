"""``HcpPatchModel``: the PEFT tuner (``BaseTuner``) of patch plugins, and ``register_patch_plugin``.

Host resolution, adapter bookkeeping, strict loading, delete and unload are those of the single-layer
kind (:class:`~peft_hcp.single.model.HcpSingleModel`): a container, like a single-layer wrapper, is a
tuner layer with ``base_layer`` and a ``blocks`` dict. What differs: patches are never merged, and a
patched module may have no parameters (an activation), which PEFT's ``_replace_module`` assumes away.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from peft_hcp.errors import MergeNotSupportedError
from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.layer import PatchPluginContainer
from peft_hcp.registry import ConfigT, generated_type
from peft_hcp.single import HcpSingleModel


class HcpPatchModel(HcpSingleModel):
    """Attaches one patch type: ``class HcpPReLUModel(HcpPatchModel, layer_cls=HcpPReLUContainer)``."""

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


def register_patch_plugin(type_name: str, block_cls: type[PatchPluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator that makes ``config_cls`` + ``block_cls`` the PEFT type ``type_name``.

    The container is ``block_cls.container_cls`` (default :class:`PatchPluginContainer`). Example::

        @register_patch_plugin("hcp_gelu_gain", GainPatch)
        @dataclass
        class HcpGainPatchConfig(HcpPatchConfig):
            start: float = 1.0
    """
    container = block_cls.container_cls or PatchPluginContainer
    if not (isinstance(container, type) and issubclass(container, PatchPluginContainer)):
        raise TypeError(f"{block_cls!r}.container_cls must subclass PatchPluginContainer, got {container!r}.")
    return generated_type(type_name, block_cls, container, HcpPatchModel)
