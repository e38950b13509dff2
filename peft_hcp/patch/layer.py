"""The containers: PEFT tuner layers that replace a patched module and run its patches.

A container replaces the module in its parent (see :mod:`peft_hcp.base.host_layer`); each patch type
has its own container subclass (``class HcpPReLUContainer(ReplacePatchContainer, type_name="hcp_prelu",
block_cls=PReLUPatch)``), and a second adapter of the same type on the same module joins the existing
container.

How patches combine (the active adapters, in the order of ``active_adapters``):

:class:`PatchPluginContainer` (chaining)
    ``args, kwargs = p.pre_forward(*args, **kwargs)`` for each patch, then the original module runs on
    the result, then ``output = p.post_forward(output, *args, **kwargs)`` for each patch.
:class:`ReplacePatchContainer` (replacing)
    The same, except that the original module does not run: ``output`` starts at ``0.0``. Each patch's
    ``post_forward`` adds its replacement, so one active patch replaces the module's output and several
    active patches give the **sum** of their replacements (HCP-Diffusion's ``PReLUPatchContainer``).

In both, with adapters disabled (``disable_adapter()``) or with no active patch on this module, the
container returns exactly what the original module returns.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, cast

from peft_hcp.base.host_layer import HostLayer
from peft_hcp.errors import MergeNotSupportedError
from peft_hcp.patch.block import PatchPluginBlock
from peft_hcp.patch.config import HcpPatchConfig


class PatchPluginContainer(HostLayer):
    """Wraps ``base_layer``; runs the active patches around it (chaining, see the module docstring)."""

    block_base: ClassVar[type] = PatchPluginBlock
    config_base: ClassVar[type] = HcpPatchConfig
    block_cls: ClassVar[type[PatchPluginBlock]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        blocks = self.blocks
        active = [] if self.disable_adapters else [blocks[n] for n in self.active_adapters if n in blocks]
        patches = cast(list[PatchPluginBlock], active)
        if not patches:
            return self.base_layer(*args, **kwargs)
        for patch in patches:
            rewritten = patch.pre_forward(*args, **kwargs)
            if not (isinstance(rewritten, tuple) and len(rewritten) == 2):
                raise TypeError(f"{type(patch).__name__}.pre_forward must return (args, kwargs), got {rewritten!r}.")
            args, kwargs = rewritten
            args = tuple(args)
        output = self.initial_output(args, kwargs)
        for patch in patches:
            output = patch.post_forward(output, *args, **kwargs)
        return output

    def initial_output(self, args: tuple, kwargs: dict) -> Any:
        """The value the patches' ``post_forward`` chain starts from: here the original module's output."""
        return self.base_layer(*args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            if name in self.blocks:
                cast(
                    PatchPluginBlock, self.blocks[name]
                ).get_delta_weight()  # raises MergeNotSupportedError, saying why
        raise MergeNotSupportedError(f"{type(self).__name__}: patches cannot be merged into a module's weights.")

    def unmerge(self) -> None:
        """Nothing to do: a patch is never merged."""


class ReplacePatchContainer(PatchPluginContainer):
    """Replacing container: the original module does not run; the active patches' outputs are summed."""

    def initial_output(self, args: tuple, kwargs: dict) -> Any:
        return 0.0
