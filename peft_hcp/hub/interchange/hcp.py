"""HCP-Diffusion LoRA checkpoints, of every layout its savers wrote, as its loaders read them.

A flat safetensors file; per adapted layer ``<layer path>.___.<tensor>``:

* HCP 2.x (``NekoPluginSaver``, read by ``HCPLoraLoader``): ``layer.W_down`` / ``layer.W_up`` (kohya's
  ``lora_down`` / ``lora_up`` shapes) and ``alpha``;
* HCP 1.x (``CkptManagerSafe``): the same under ``layer.lora_down.weight`` / ``layer.lora_up.weight``, every key
  nested under the checkpoint part it belongs to (``lora:…``, ``plugin:…``; the EMA copies under ``lora_ema:…``,
  ``plugin_ema:…``), ``scale`` before HCP named it ``alpha``.

``alpha`` is the *scale* the layer applies (HCP stores ``alpha / rank``). Layer paths are those of HCP's trainer
model: ``denoiser.`` before the UNet or transformer, ``TE.`` before the text encoder (SDXL: ``TE.clip_L.`` and
``TE.clip_bigG.``). A checkpoint of one bare model has no such root (``lora_unet-1000.safetensors``,
``lora_TE-1000.safetensors``, HCP 1.x ``unet-1000.safetensors``, ``text_encoder-1000.safetensors``): its component
is the one its file name says, else the one whose layers its paths name. A CLIP path with ``text_model.`` loads
onto a transformers 5 encoder, which has no such level.

HCP's webui export (``LoraWebuiFormat``) writes that scale where kohya expects ``alpha``: import such
files with ``import_kohya(..., alpha_is_scale=True)``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from peft_hcp.base.files import read_safetensors
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import CheckpointError, few
from peft_hcp.hub.interchange.kohya import install_layers
from peft_hcp.hub.interchange.stock import interchange_components
from peft_hcp.single.lowrank import lowrank_type_of


#: HCP's path prefix of each pipeline component, most specific first
HCP_PREFIXES = (
    ("TE.clip_L.", "text_encoder"),
    ("TE.clip_bigG.", "text_encoder_2"),
    ("TE.", "text_encoder"),
    ("denoiser.", "unet"),
    ("denoiser.", "transformer"),
)
#: the roots a checkpoint of one bare model leaves out
_ROOTS = ("denoiser.", "TE.")
#: which root a bare model's file name stands for (HCP 2.x ``lora_unet-N``, ``lora_TE-N``; 1.x ``unet-N``,
#: ``text_encoder-N``)
_FILE_ROOTS = (
    (re.compile(r"^(lora_)?unet[-_.]", re.I), "denoiser."),
    (re.compile(r"^(lora_te|text_encoder)[-_.]", re.I), "TE."),
)
_SEPARATOR = ".___."
_HCP_TO_KOHYA = {
    "layer.W_down": "lora_down.weight",
    "layer.W_up": "lora_up.weight",
    "layer.lora_down.weight": "lora_down.weight",  # HCP 1.x
    "layer.lora_up.weight": "lora_up.weight",
}
_SCALES = ("alpha", "scale")  # HCP 1.x named the buffer ``scale`` until May 2023
#: the parts of an HCP 1.x checkpoint (``<part>:<key>``) that hold plugins, and their EMA copies
_PLUGIN_PARTS, _EMA_PARTS = ("lora", "plugin"), ("lora_ema", "plugin_ema")


def is_hcp_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """Whether a file's keys are HCP plugin keys (``<layer>.___.<plugin tensor>``)."""
    return bool(state) and all(_SEPARATOR in key for key in state)


def import_hcp(
    target,
    path: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    component: Optional[str] = None,
    ema: bool = False,
) -> dict[str, list[str]]:
    """Load an HCP-Diffusion LoRA checkpoint (any layout, see the module) into a pipeline or model as ``adapter_name``.

    The result computes what HCP's loader makes of the file. ``component`` (``"unet"``, ``"text_encoder"`` …) names
    the component of a checkpoint without ``denoiser.`` / ``TE.`` roots, overriding its file name; ``ema`` reads an
    HCP 1.x checkpoint's EMA copy (``lora_ema:``) instead of its weights. Returns ``{component: [module names]}``;
    unknown layers or tensors (an HCP LoRA bias included) are refused by name, leaving the model as it was.
    """
    state = _plugin_state(read_safetensors(path), path, ema)
    components = interchange_components(target)
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        layer, sep, part = key.partition(_SEPARATOR)
        if not sep:
            raise CheckpointError(f"{path}: {key!r} is not an HCP plugin key (<layer>{_SEPARATOR}<tensor>).")
        layers[layer][part] = value
    root = _root_of(list(layers), path, components, component)
    found = {layer: _place(root + layer, components) for layer in layers}
    places = {layer: place for layer, place in found.items() if place is not None}
    unknown = sorted(root + layer for layer in layers if layer not in places)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} layer(s) match no layer of this {'/'.join(components)} (HCP prefixes "
            f"{sorted({p for p, _ in HCP_PREFIXES})}): {few(unknown)}."
        )
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    labels: dict[str, str] = {}
    block_cls = None
    for layer, parts in layers.items():
        extra = sorted(set(parts) - set(_HCP_TO_KOHYA) - set(_SCALES))
        if extra:
            raise CheckpointError(f"{path}: layer {layer} has tensors {extra} that an HCP LoRA import does not take.")
        tensors = {_HCP_TO_KOHYA[name]: value for name, value in parts.items() if name in _HCP_TO_KOHYA}
        block_cls = lowrank_type_of(set(tensors), layer, path)
        scale = next((parts[name] for name in _SCALES if name in parts), None)
        # HCP applies alpha itself; kohya applies alpha / rank. Without one, HCP's LoraBlock keeps 1 / rank.
        tensors["alpha"] = scale * block_cls.kohya_rank(tensors) if scale is not None else torch.tensor(1.0)
        placed_in, name = places[layer]
        by_component[placed_in][name] = tensors
        labels[name] = f"{layer} ({name})"
    if block_cls is None:
        raise CheckpointError(f"{path} holds no plugin tensors.")
    return install_layers(components, by_component, labels, block_cls, adapter_name, is_trainable, path)


def _plugin_state(state: dict[str, torch.Tensor], path: str, ema: bool) -> dict[str, torch.Tensor]:
    """The plugin keys of a checkpoint: an HCP 1.x checkpoint's ``lora:`` / ``plugin:`` parts, unnested."""
    if not any(":" in key for key in state):
        return state
    wanted = _EMA_PARTS if ema else _PLUGIN_PARTS
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        part, sep, rest = key.partition(":")
        if not sep or part not in (*_PLUGIN_PARTS, *_EMA_PARTS):
            raise CheckpointError(
                f"{path}: {key!r} is in no plugin part of an HCP 1.x checkpoint "
                f"({', '.join(p + ':' for p in (*_PLUGIN_PARTS, *_EMA_PARTS))}); a 'base:' part holds trained model "
                "weights, not a plugin, and is not imported."
            )
        parts[part][rest] = value
    flat: dict[str, torch.Tensor] = {}
    for part in wanted:
        twice = sorted(set(flat) & set(parts[part]))
        if twice:
            raise CheckpointError(f"{path}: {few(twice)} appear in both the 'lora:' and 'plugin:' parts.")
        flat.update(parts[part])
    if not flat:
        raise CheckpointError(f"{path} has no {' or '.join(p + ':' for p in wanted)} part (it has {sorted(parts)}).")
    return flat


def _root_of(layers: list[str], path: str, components: dict[str, nn.Module], component: Optional[str]) -> str:
    """The root to put before the file's layer paths: ``""`` when they carry one (``denoiser.``, ``TE.``)."""
    if component is not None:
        root = next((prefix for prefix, name in reversed(HCP_PREFIXES) if name == component), None)
        if root is None or component not in components:
            raise ValueError(f"component={component!r} is none of this target's components {sorted(components)}.")
        return "" if all(layer.startswith(_ROOTS) for layer in layers) else root
    if any(layer.startswith(_ROOTS) for layer in layers):
        return ""
    name = os.path.basename(path)
    by_name = next((root for pattern, root in _FILE_ROOTS if pattern.match(name)), None)
    if by_name is not None:
        return by_name
    fitting = [root for root in _ROOTS if all(_place(root + layer, components) for layer in layers)]
    if len(fitting) != 1:
        found = "the layers of several components" if fitting else "the layers of no component"
        raise CheckpointError(
            f"{path}: its layer paths have no HCP root ({', '.join(_ROOTS)}), its file name does not say which model "
            f"they belong to (lora_unet-N, lora_TE-N, unet-N, text_encoder-N), and they name {found} of this "
            f"{'/'.join(components)}; pass component=."
        )
    return fitting[0]


def _place(layer: str, components: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``(component, module name)`` of an HCP layer path, or ``None``."""
    for prefix, component in HCP_PREFIXES:
        model = components.get(component)
        if model is None or not layer.startswith(prefix):
            continue
        name = layer[len(prefix) :]
        if not hasattr(model, "text_model"):
            name = name.removeprefix("text_model.")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return None
        return (component, name) if isinstance(base_module(module), (nn.Linear, nn.Conv2d)) else None
    return None
