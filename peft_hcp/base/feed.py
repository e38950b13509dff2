"""The input feeder: extra inputs (a ControlNet condition image, a style vector) for plugins of every kind,
for the length of a call.

``PeftModel.forward`` and diffusers pipelines pass only the host model's own arguments, so a plugin that
needs more gets it through an explicit context::

    with peft_hcp.feed(model, cond=image):
        noise_pred = model(latents, t, text)

``model`` may be a bare module, a ``PeftModel``, a ``DistributedDataParallel`` (or any other wrapper
module) or a diffusers pipeline: the feeder walks the modules it holds and hands the inputs to every
plugin block (single-layer, patch, from -> to or many -> many: any :class:`~peft_hcp.base.blocks.WeightedBlock`)
that declares them in ``input_keys``. HCP-Diffusion's feeder was an attribute on the host module, which a
DDP wrapper hides; walking ``modules()`` reaches the plugins through any wrapper.

Checks: a key no plugin takes, or a plugin left without a key it takes, is an error naming both sides.
Several plugins taking the same key get the same value. On exit the previous inputs come back, so
feeds nest. The feeder only delivers; each plugin checks the values it gets (shapes, batch).

The fed inputs and the cross-layer plugins' activation caches belong to the ``with`` block (a
:class:`CallState` in a ``contextvars`` value), never to the shared model: several threads or asyncio
tasks may each run their own ``feed`` through one model at the same time. Under ``torch.compile`` (which
cannot trace a ``ContextVar``) plugins read their inputs from the block and cache on it instead, with no
graph break: a compiled model runs one fed call at a time. Run the backward pass of a fed
call inside its ``with`` block (activation checkpointing recomputes from the cached values there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from peft_hcp.base.components import pipeline_components


if TYPE_CHECKING:
    from peft_hcp.base.blocks import WeightedBlock


class ActivationCache(dict):
    """Values held for one call (fed inputs, captured activations). A deep copy of a model starts empty."""

    def __deepcopy__(self, memo: dict) -> ActivationCache:
        return type(self)()

    def __reduce__(self):  # pickling (e.g. for multiprocessing) drops activations too
        return (type(self), ())


@dataclass
class CallState:
    """The fed inputs and activation caches of one ``feed`` block, keyed by plugin block id."""

    inputs: dict[int, ActivationCache] = field(default_factory=dict)
    caches: dict[int, ActivationCache] = field(default_factory=dict)


#: the state of the ``feed`` block the current thread / asyncio task runs in, if any
current_call: ContextVar[Optional[CallState]] = ContextVar("peft_hcp_call", default=None)
#: where ``feed`` also leaves each plugin's inputs for a ``torch.compile``d call: dynamo cannot trace a
#: ``ContextVar`` (each read would break the graph), so compiled code reads this attribute of the block
COMPILED_INPUTS = "_compiled_inputs"


def call_state() -> Optional[CallState]:
    """The current ``feed`` block's state. On an autograd device thread (activation checkpointing recomputing
    during a CUDA backward) it is the state of the thread that launched ``backward()``: torch stashes that
    thread's ``contextvars`` context in the thread-local state it hands to its worker threads."""
    call = current_call.get()
    if call is None and torch._C._is_key_in_tls("context"):
        call = torch._C._get_obj_in_tls("context").get(current_call)
    return call


def fed_plugins(target: Any) -> list[WeightedBlock]:
    """The plugin blocks inside ``target`` (module or pipeline) that take fed inputs, each once."""
    from peft_hcp.base.blocks import (
        WeightedBlock,  # blocks.py reads this module's state: import when called
    )

    seen: dict[int, WeightedBlock] = {}
    for root in pipeline_components(target, names=None).values():
        for module in root.modules():
            if isinstance(module, WeightedBlock) and module.input_keys:
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextmanager
def feed(target: Any, **inputs: Any) -> Iterator[None]:
    """Give ``inputs`` to the plugins inside ``target`` while the ``with`` block runs."""
    plugins = fed_plugins(target)
    if not plugins:
        raise ValueError(
            f"feed(): no plugin inside {type(target).__name__} takes inputs; nothing to feed {sorted(inputs)} to."
        )
    accepted = sorted({key for plugin in plugins for key in plugin.input_keys})
    unknown = sorted(set(inputs) - set(accepted))
    if unknown:
        raise ValueError(f"feed(): no plugin takes {unknown}; the plugins here take {accepted}.")
    for plugin in plugins:
        missing = [key for key in plugin.input_keys if key not in inputs]
        if missing:
            raise ValueError(
                f"feed(): {type(plugin).__name__} (adapter {plugin.adapter_name!r}) needs {missing} as well; "
                f"got {sorted(inputs)}."
            )
    outer = current_call.get()
    fed = {id(plugin): ActivationCache({key: inputs[key] for key in plugin.input_keys}) for plugin in plugins}
    token = current_call.set(CallState(inputs={**(outer.inputs if outer else {}), **fed}))
    mirrored = [(plugin, plugin.__dict__.get(COMPILED_INPUTS)) for plugin in plugins]
    for plugin in plugins:
        plugin.__dict__[COMPILED_INPUTS] = fed[id(plugin)]
    try:
        yield
    finally:
        current_call.reset(token)
        for plugin, previous in mirrored:
            plugin.__dict__[COMPILED_INPUTS] = previous
