"""Block bookkeeping: the PEFT tuner layer that holds one plugin block (or module of blocks) per adapter.

Every peft-hcp tuner layer keeps its blocks in a ``ModuleDict`` named ``<type>_blocks`` keyed by adapter
name (PEFT's ``adapter_layer_names``), so a state-dict key reads ``...<type>_blocks.<adapter>.<param>``.
A concrete layer class names its type and block in its class statement::

    class HcpLoraLayer(SinglePluginLayer, type_name="hcp_lora", block_cls=LoraBlock):
        ...

Adapter weights (diffusers' ``set_adapters(names, weights)``, a pipeline's LoRA scale) are routed here
too: diffusers calls ``set_scale(adapter, weight)`` on every tuner layer, and ``scale_layer`` /
``unscale_layer`` around a pipeline call given a LoRA scale. A block that can weight its effect sets
``supports_scaling`` and multiplies by ``self.scaling``; one that cannot refuses an explicit weight other
than 1.0, and is skipped by a pipeline-wide LoRA scale (meant for the LoRA-like adapters beside it).

Fed inputs (see :mod:`peft_hcp.base.feed`) are shared the same way: a block of any kind names the extra
inputs it takes in ``input_keys`` and reads them with :meth:`WeightedBlock.require_input` during the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Optional, Union, cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.base.config import HcpConfig
from peft_hcp.base.feed import COMPILED_INPUTS, ActivationCache, call_state
from peft_hcp.registry import LazyClass


class WeightedBlock(nn.Module):
    """Base of every plugin block: ``scaling`` is ``base_scaling`` (the trained strength) times the weight;
    ``input_keys`` names the extra inputs it takes through :func:`peft_hcp.feed`.

    ``scaling`` is a float, or, once :meth:`hold_scaling_in_buffer` ran (before ``torch.compile`` for hot-swapping),
    a 0-dim buffer changed in place: a compiled graph reads it as an input, so a new weight does not recompile.
    """

    supports_scaling: ClassVar[bool] = False
    input_keys: ClassVar[tuple[str, ...]] = ()
    base_scaling: float = 1.0
    #: the adapter this block belongs to (set by its layer), for error messages
    adapter_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.scaling: Union[float, torch.Tensor] = 1.0  # an instance attribute, so that a buffer may replace it

    @property
    def inputs(self) -> ActivationCache:
        """The inputs fed to this block by the enclosing :func:`peft_hcp.feed` (empty outside one)."""
        if torch.compiler.is_compiling():
            return self.__dict__.get(COMPILED_INPUTS) or ActivationCache()
        call = call_state()
        return ActivationCache() if call is None else call.inputs.get(id(self), ActivationCache())

    def require_input(self, key: str) -> Any:
        """The fed input ``key``, or a clear error saying how to feed it."""
        inputs = self.inputs
        if key not in inputs:
            raise ValueError(
                f"{type(self).__name__} (adapter {self.adapter_name!r}) needs the input {key!r}: call the model "
                f"inside `with peft_hcp.feed(model, {key}=...):`."
            )
        return inputs[key]

    def set_scale(self, scale: float) -> None:
        """Weight this block's effect by ``scale`` relative to its trained strength."""
        if not self.supports_scaling:
            if scale != 1.0:
                raise ValueError(f"{type(self).__name__} does not support adapter weights other than 1.0.")
            return
        self.set_scaling(self.base_scaling * float(scale))

    def set_scaling(self, value: float) -> None:
        """Set ``scaling`` to ``value``: in place when it is a buffer."""
        if "scaling" in self._buffers:
            self.get_buffer("scaling").fill_(value)
        else:
            self.scaling = value

    def hold_scaling_in_buffer(self) -> None:
        """Keep ``scaling`` in a non-persistent 0-dim buffer (on the block's device) from now on."""
        if "scaling" in self._buffers:
            return
        value = float(self.__dict__.pop("scaling"))
        device = next((p.device for p in self.parameters()), None)
        self.register_buffer("scaling", torch.tensor(value, device=device), persistent=False)


class HostedBlock(WeightedBlock):
    """A block that lives on one host module (the single-layer and patch kinds), built from that host and the
    adapter's config."""

    #: the module types the block attaches to; a selected container attaches it to each such module inside
    wrapable_classes: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, host: nn.Module, config: HcpConfig) -> None:
        super().__init__()


class BlockLayer(nn.Module, BaseTunerLayer):
    """A PEFT tuner layer holding the blocks of one plugin type, keyed by adapter name."""

    type_name: ClassVar[str]
    block_cls: ClassVar[type[WeightedBlock]]
    blocks_attr: ClassVar[str]
    #: the block and config base classes of this kind; a type's classes must derive from them
    block_base: ClassVar[type[WeightedBlock]] = WeightedBlock
    config_base: ClassVar[type]
    #: plain attributes of this layer that an adapter route changes, put back when it fails
    #: (see :mod:`peft_hcp.base.snapshot`; PEFT's own bookkeeping is covered there)
    snapshot_attrs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(
        cls, *, type_name: Optional[str] = None, block_cls: Union[type, LazyClass, None] = None, **kwargs
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type_name is not None:
            cls.type_name = type_name
            cls.blocks_attr = f"{type_name}_blocks"
            cls.adapter_layer_names = (cls.blocks_attr,)
        if isinstance(block_cls, LazyClass):
            cls.block_cls = block_cls  # type: ignore[assignment]  # a class on first access
        elif block_cls is not None:
            if not (isinstance(block_cls, type) and issubclass(block_cls, cls.block_base)):
                raise TypeError(f"{block_cls!r} is not a {cls.block_base.__name__} subclass.")
            if hasattr(block_cls, "wrapable_classes") and not block_cls.wrapable_classes:
                raise TypeError(
                    f"{block_cls.__name__}.wrapable_classes is empty: say which module types it attaches to."
                )
            cls.block_cls = block_cls

    def __init__(self) -> None:
        super().__init__()
        self.add_module(self.blocks_attr, nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = []

    def remove_from(self, model: nn.Module, name: str) -> None:
        """Take this layer (called ``name`` in ``model``) out, restoring what it replaced: per kind."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleDict:
        """This layer's plugin blocks, keyed by adapter name."""
        return self._modules[self.blocks_attr]  # type: ignore[return-value]

    def _blocks_of(self, adapter_name: str) -> Sequence[WeightedBlock]:
        """The weighted blocks of ``adapter_name`` here (a kind may hold several per adapter)."""
        return [cast(WeightedBlock, self.blocks[adapter_name])] if adapter_name in self.blocks else []

    def set_scale(self, adapter: str, scale: float) -> None:
        for block in self._blocks_of(adapter):
            block.set_scale(scale)

    def scale_layer(self, scale: float) -> None:
        for block in self._scalable_active_blocks():
            block.set_scale(float(block.scaling) / block.base_scaling * scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for block in self._scalable_active_blocks():
            block.set_scale(1.0 if scale is None else float(block.scaling) / block.base_scaling / scale)

    def _scalable_active_blocks(self) -> list[WeightedBlock]:
        return [b for name in self.active_adapters for b in self._blocks_of(name) if b.supports_scaling]
