"""Base classes of the cross-layer plugins: ``PluginBlock`` (from -> to) and ``MultiPluginBlock`` (many -> many).

A cross-layer plugin does not replace any layer. Its blocks live in a container inside the model (see
:mod:`peft_hcp.hooked.layer`) and see the host through forward hooks registered on the selected layers:

*from*-layers are read: a plain selector runs the hook after the layer (its inputs and output are
available), ``prehook:`` runs it before the layer (only its inputs are).
*to*-layers are changed: a plain selector changes the layer's output, ``prehook:`` changes its inputs.

What a block reads in a from-hook stays in :attr:`cache` until the next forward overwrites it. Keeping it,
rather than popping it, is what makes activation checkpointing work: a recomputed to-layer reads the same
value again.

*Calls in parallel.* Inside :func:`peft_hcp.feed` the fed inputs and the activation caches belong to that
``with`` block (a :class:`~peft_hcp.base.feed.CallState` in a ``contextvars.ContextVar``), not to the
shared block: threads and asyncio tasks each running their own ``feed`` through one model do not see each
other's values. Outside any ``feed`` a block uses its own cache, so one model runs one such call at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, cast

import torch
from torch import nn

from peft_hcp.base.blocks import WeightedBlock
from peft_hcp.base.feed import ActivationCache, call_state
from peft_hcp.selectors import Target


class _HookedBlock(WeightedBlock):
    """What both cross-layer kinds share: an activation cache (per `feed` call, see the module docstring)."""

    supports_scaling: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._own_cache = ActivationCache()

    @property
    def cache(self) -> ActivationCache:
        """Activations of the current call: those of the enclosing ``feed`` block, else (and when compiled)
        this block's own."""
        call = None if torch.compiler.is_compiling() else call_state()
        if call is None:
            return self._own_cache
        return call.caches.setdefault(id(self), ActivationCache())

    @classmethod
    def check_host(cls, host: nn.Module, config: Any) -> None:
        """Refuse an unsupported ``host`` (raise, naming its type and what it lacks) before anything is attached."""


def layer_inputs(args: tuple, kwargs: dict) -> tuple:
    """A layer's positional inputs; a layer called with keywords only (diffusers' transformer blocks:
    ``block(hidden_states=..., temb=...)``) presents its first keyword argument as the one input."""
    if args or not kwargs:
        return args
    return (next(iter(kwargs.values())),)


def with_first_input(args: tuple, kwargs: dict, new: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the first input (see :func:`layer_inputs`) replaced by ``new``."""
    if args or not kwargs:
        return (new, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: new}


def element(value: Any, index: int = 0) -> Any:
    """Element ``index`` of a layer's value: a tensor is itself (``index`` 0), a tuple or list gives its
    ``index``-th item, a dataclass (diffusers' ``BaseOutput``) its ``index``-th field."""
    if isinstance(value, (tuple, list)):
        return value[index]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return getattr(value, dataclasses.fields(value)[index].name)
    if index != 0:
        raise IndexError(f"element {index} of a {type(value).__name__}: only tuples and dataclasses have several.")
    return value


def with_element(value: Any, index: int, new: Any) -> Any:
    """``value`` with :func:`element` ``index`` replaced by ``new``, of the same type."""
    if isinstance(value, (tuple, list)):
        items = list(value)
        items[index] = new
        if hasattr(value, "_fields"):  # a namedtuple
            return cast(Any, value)._replace(**{cast(Any, value)._fields[index]: new})
        return type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{dataclasses.fields(value)[index].name: new})
    return new


class PluginBlock(_HookedBlock):
    """A plugin that reads one *from*-layer and changes one *to*-layer (HCP-Diffusion's ``PluginBlock``).

    Subclass it and write :meth:`forward`. The constructor gets the two resolved layers (``Target``:
    ``name``, ``module``, ``prehook``) and the adapter config. Set ``from_output = True`` to receive the
    from-layer's output instead of its inputs (not possible with a ``prehook:`` from-layer).

    The layers may be any modules, whole transformer or ResNet blocks included. Their inputs come as a tuple
    of the positional arguments; a layer called with keywords only presents its first keyword argument as
    the one input (:func:`layer_inputs`). An output is passed as the layer returned it: a tensor, a tuple
    (Flux's blocks return ``(encoder_hidden_states, hidden_states)``) or a dataclass (``BaseOutput``);
    :func:`element` / :func:`with_element` read and rebuild one element of it.
    """

    from_output: ClassVar[bool] = False

    def __init__(self, from_layer: Target, to_layer: Target, config: Any) -> None:
        super().__init__()
        self.from_name = from_layer.name
        self.to_name = to_layer.name
        self.to_prehook = to_layer.prehook

    def forward(self, fea_from: Any, fea_in: tuple, fea_out: Optional[Any]) -> Any:
        """Return the to-layer's new output, or with a ``prehook:`` to-layer (``fea_out is None``) its new
        positional inputs (a tuple, or one tensor that replaces the first input).

        ``fea_from`` is the from-layer's inputs (a tuple), or its output with ``from_output``.
        """
        raise NotImplementedError

    def from_layer_hook(self, args: tuple, kwargs: dict, output: Optional[Any]) -> None:
        self.cache["from"] = output if self.from_output else layer_inputs(args, kwargs)

    def to_layer_hook(self, args: tuple, kwargs: dict, output: Optional[Any]) -> Any:
        if "from" not in self.cache:
            raise RuntimeError(
                f"{type(self).__name__} (adapter {self.adapter_name!r}): the to-layer {self.to_name!r} ran before "
                f"its from-layer {self.from_name!r} in this forward; pick a from-layer that runs earlier "
                "(or read it with 'prehook:')."
            )
        fea_in = layer_inputs(args, kwargs)
        if output is not None:
            return self(self.cache["from"], fea_in, output)
        new_inputs = self(self.cache["from"], fea_in, None)
        if isinstance(new_inputs, torch.Tensor):
            return with_first_input(args, kwargs, new_inputs)
        if not args and kwargs:
            return with_first_input(args, kwargs, new_inputs[0])
        return tuple(new_inputs), kwargs


class MultiPluginBlock(_HookedBlock):
    """One plugin instance fed by several *from*-layers and writing into several *to*-layers.

    ``from_layers`` / ``to_layers`` are the resolved layers in index order: the order of the selectors in
    the config, a regex contributing all its matches in model order at its position. The hooks get that
    index. Like every plugin block it may take fed inputs (``input_keys``, :meth:`require_input`).
    """

    def __init__(self, from_layers: list[Target], to_layers: list[Target], host: nn.Module, config: Any) -> None:
        super().__init__()
        self.from_names = [t.name for t in from_layers]
        self.to_names = [t.name for t in to_layers]

    @classmethod
    def default_layers(cls, host: nn.Module) -> tuple[list[str], list[str]]:
        """The ``(from_layers, to_layers)`` selectors used where the config leaves them ``None``."""
        raise ValueError(f"{cls.__name__} has no default layers: set `from_layers` and `to_layers` in its config.")

    def from_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> None:
        """Read from-layer ``idx``; ``output`` is ``None`` for a ``prehook:`` from-layer."""
        raise NotImplementedError

    def to_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> Any:
        """Change to-layer ``idx``: return its new output, or for a ``prehook:`` to-layer (``output is None``)
        its new ``(args, kwargs)``; ``None`` leaves it unchanged."""
        raise NotImplementedError
