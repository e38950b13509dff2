"""The input feeder: extra inputs (a ControlNet condition image) for plugins, for the length of a call.

``PeftModel.forward`` and diffusers pipelines pass only the host model's own arguments, so a plugin that
needs more gets it through an explicit context::

    with peft_hcp.feed(model, cond=image):
        noise_pred = model(latents, t, text)

``model`` may be a bare module, a ``PeftModel``, a ``DistributedDataParallel`` (or any other wrapper
module) or a diffusers pipeline: the feeder walks the modules it holds and hands the inputs to every
plugin block that declares them (``input_keys``). HCP-Diffusion's feeder was an attribute on the host
module, which a DDP wrapper hides; walking ``modules()`` reaches the plugins through any wrapper.

Checks: a key no plugin takes, or a plugin left without a key it takes, is an error naming both sides.
Several plugins taking the same key get the same value. On exit the previous inputs come back, so
feeds nest. The feeder only delivers; each plugin checks the values it gets (shapes, batch).

The fed inputs and the plugins' activation caches belong to the ``with`` block (a ``contextvars`` value),
never to the shared model: several threads or asyncio tasks may each run their own ``feed`` through one
model at the same time. Run the backward pass of a fed call inside its ``with`` block (activation
checkpointing recomputes from the cached values there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from peft_hcp.hooked.block import (
    ActivationCache,
    CallState,
    MultiPluginBlock,
    current_call,
)


def _modules_of(target: Any) -> list[nn.Module]:
    if isinstance(target, nn.Module):
        return [target]
    components = getattr(target, "components", None)
    if isinstance(components, dict):  # a diffusers pipeline
        return [m for m in components.values() if isinstance(m, nn.Module)]
    raise TypeError(
        f"feed() takes a torch module (a model, PeftModel or DDP wrapper) or a diffusers pipeline, "
        f"got {type(target).__name__}."
    )


def _plugins_of(target: Any) -> list[MultiPluginBlock]:
    seen: dict[int, MultiPluginBlock] = {}
    for root in _modules_of(target):
        for module in root.modules():
            if isinstance(module, MultiPluginBlock) and module.input_keys:
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextmanager
def feed(target: Any, **inputs: Any) -> Iterator[None]:
    """Give ``inputs`` to the plugins inside ``target`` while the ``with`` block runs."""
    plugins = _plugins_of(target)
    if not plugins:
        raise ValueError(f"feed(): no plugin inside {type(target).__name__} takes inputs; nothing to feed {sorted(inputs)} to.")
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
    try:
        yield
    finally:
        current_call.reset(token)
