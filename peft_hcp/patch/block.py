"""``PatchPluginBlock``: the base class of a plugin that takes over a whole module.

A patch is written as in HCP-Diffusion. The module it patches is replaced by a container (a PEFT
tuner layer, see :mod:`peft_hcp.patch.layer`) that calls, for every active patch:

``pre_forward(*args, **kwargs) -> (args, kwargs)``
    Rewrites the arguments the module is called with (default: unchanged).
``post_forward(output, *args, **kwargs) -> output``
    Rewrites the module's output (default: unchanged); it receives the rewritten arguments.

``container_cls`` says how the container combines the patches: :class:`PatchPluginContainer` runs the
original module between the two steps; :class:`ReplacePatchContainer` does not run it at all and
starts ``post_forward`` from ``0.0``, so the patches *replace* the module (the PReLU example).

``wrapable_classes`` lists the module types a patch attaches to; selecting a container (``''`` is the
whole model) attaches it to every such module inside, and a selected module of another type is an
:class:`~peft_hcp.errors.UnsupportedLayerError`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from torch import nn

from peft_hcp.base.blocks import HostedBlock
from peft_hcp.errors import MergeNotSupportedError


class PatchPluginBlock(HostedBlock):
    """One adapter's patch of one module. Subclass it, set ``wrapable_classes``, override the two steps."""

    container_cls: ClassVar[Optional[type[nn.Module]]] = None  # None: PatchPluginContainer

    def pre_forward(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, output: Any, *args: Any, **kwargs: Any) -> Any:
        return output

    def get_delta_weight(self):
        raise MergeNotSupportedError(
            f"{type(self).__name__} cannot be merged: a patch changes how its module computes, which no "
            "weight of the original module can express. Keep it unmerged, or unload() it."
        )
