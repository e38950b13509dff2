"""The containers: PEFT tuner layers that replace a patched module and run its patches.

A container replaces the module in its parent (``base_layer`` is the original, untouched), so state
dicts, device moves and ``deepcopy`` see the patches, and unloading puts the original module object
back. Each registered patch type gets its own container subclass (see :func:`make_container_class`)
whose patches live in a ``ModuleDict`` named ``<type>_patches``, keyed by adapter name: a second
adapter of the same type on the same module joins the existing container.

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

from typing import Any, ClassVar, Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.errors import MergeNotSupportedError, UnsupportedLayerError
from peft_hcp.patch.block import PatchPluginBlock

_HOST_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size")


class PatchPluginContainer(nn.Module, BaseTunerLayer):
    """Wraps ``base_layer``; runs the active patches around it (chaining, see the module docstring)."""

    block_cls: ClassVar[type[PatchPluginBlock]]
    blocks_attr: ClassVar[str]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.add_module(self.blocks_attr, nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        host = self.get_base_layer()
        for attr in _HOST_ATTRS:
            if hasattr(host, attr):
                setattr(self, attr, getattr(host, attr))
        self.update_layer(adapter_name, config)

    @property
    def blocks(self) -> nn.ModuleDict:
        """The patches of this container, keyed by adapter name."""
        return self._modules[self.blocks_attr]  # type: ignore[return-value]

    def update_layer(self, adapter_name: str, config) -> None:
        host = self.get_base_layer()
        if not isinstance(host, self.block_cls.wrapable_classes):
            raise UnsupportedLayerError(
                f"{self.block_cls.__name__} patches only "
                f"{'/'.join(c.__name__ for c in self.block_cls.wrapable_classes)} modules, not {type(host).__name__}."
            )
        self.blocks[adapter_name] = self.block_cls(host, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        blocks = self.blocks
        patches = [] if self.disable_adapters else [blocks[n] for n in self.active_adapters if n in blocks]
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
                self.blocks[name].get_delta_weight()  # raises MergeNotSupportedError, saying why
        raise MergeNotSupportedError(f"{type(self).__name__}: patches cannot be merged into a module's weights.")

    def unmerge(self) -> None:
        """Nothing to do: a patch is never merged."""

    def get_delta_weight(self, adapter_name: str):
        return self.blocks[adapter_name].get_delta_weight()

    # -- adapter weights (diffusers' set_adapters, a pipeline's LoRA scale) ---------------------

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.blocks:
            self.blocks[adapter].set_scale(scale)

    def scale_layer(self, scale: float) -> None:
        """A LoRA scale given to a whole model; patches without ``supports_scaling`` ignore it."""
        for name in self.active_adapters:
            block = self.blocks[name] if name in self.blocks else None
            if block is not None and block.supports_scaling:
                block.set_scale(block.scaling * scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            block = self.blocks[name] if name in self.blocks else None
            if block is not None and block.supports_scaling:
                block.set_scale(1.0 if scale is None else block.scaling / scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_layer!r}, adapters={list(self.blocks)})"


class ReplacePatchContainer(PatchPluginContainer):
    """Replacing container: the original module does not run; the active patches' outputs are summed."""

    def initial_output(self, args: tuple, kwargs: dict) -> Any:
        return 0.0


def make_container_class(type_name: str, block_cls: type[PatchPluginBlock]) -> type[PatchPluginContainer]:
    """The tuner-layer class of one patch type: ``block_cls.container_cls`` bound to ``block_cls``."""
    base = block_cls.container_cls or PatchPluginContainer
    if not (isinstance(base, type) and issubclass(base, PatchPluginContainer)):
        raise TypeError(f"{block_cls.__name__}.container_cls must subclass PatchPluginContainer, got {base!r}.")
    blocks_attr = f"{type_name}_patches"
    return type(
        f"{block_cls.__name__}Container",
        (base,),
        {
            "block_cls": block_cls,
            "blocks_attr": blocks_attr,
            "adapter_layer_names": (blocks_attr,),
            "__module__": block_cls.__module__,
            "__qualname__": f"{block_cls.__qualname__}Container",
        },
    )
