"""HCP-Diffusion 2.x LoRA plugin checkpoints, as its ``NekoPluginSaver`` writes them and ``HCPLoraLoader`` reads them.

A flat safetensors file; per adapted layer ``<layer path>.___.layer.W_down`` / ``.___.layer.W_up`` (kohya's
``lora_down`` / ``lora_up`` shapes) and ``.___.alpha``, the *scale* the layer applies (HCP stores
``alpha / rank``). Layer paths are those of HCP's trainer model: ``denoiser.`` before the UNet or
transformer, ``TE.`` before the text encoder (SDXL: ``TE.clip_L.`` and ``TE.clip_bigG.``). A CLIP path with
``text_model.`` loads onto a transformers 5 encoder, which has no such level.

HCP's webui export (``LoraWebuiFormat``) writes that scale where kohya expects ``alpha``: import such
files with ``import_kohya(..., alpha_is_scale=True)``.
"""

from __future__ import annotations

from collections import defaultdict

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
_SEPARATOR = ".___."
_HCP_TO_KOHYA = {"layer.W_down": "lora_down.weight", "layer.W_up": "lora_up.weight"}


def is_hcp_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """Whether a file's keys are HCP plugin keys (``<layer>.___.<plugin tensor>``)."""
    return bool(state) and all(_SEPARATOR in key for key in state)


def import_hcp(target, path: str, adapter_name: str = "default", is_trainable: bool = False) -> dict[str, list[str]]:
    """Load an HCP-Diffusion LoRA plugin checkpoint into a pipeline or model as adapter ``adapter_name``.

    The result computes what ``HCPLoraLoader`` makes of the file. Returns ``{component: [module names]}``;
    unknown layers or tensors (an HCP LoRA bias included) are refused by name, leaving the model as it was.
    """
    state = read_safetensors(path)
    components = interchange_components(target)
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        layer, sep, part = key.partition(_SEPARATOR)
        if not sep:
            raise CheckpointError(f"{path}: {key!r} is not an HCP plugin key (<layer>{_SEPARATOR}<tensor>).")
        layers[layer][part] = value
    places = {layer: _place(layer, components) for layer in layers}
    unknown = sorted(layer for layer, place in places.items() if place is None)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} layer(s) match no layer of this {'/'.join(components)} (HCP prefixes "
            f"{sorted({p for p, _ in HCP_PREFIXES})}): {few(unknown)}."
        )
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    labels: dict[str, str] = {}
    block_cls = None
    for layer, parts in layers.items():
        extra = sorted(set(parts) - set(_HCP_TO_KOHYA) - {"alpha"})
        if extra:
            raise CheckpointError(f"{path}: layer {layer} has tensors {extra} that an HCP LoRA import does not take.")
        tensors = {_HCP_TO_KOHYA.get(name, name): value for name, value in parts.items()}
        block_cls = lowrank_type_of(set(tensors), layer, path)
        # HCP applies alpha itself; kohya applies alpha / rank. Without one, HCP's LoraBlock keeps 1 / rank.
        tensors["alpha"] = parts["alpha"] * block_cls.kohya_rank(tensors) if "alpha" in parts else torch.tensor(1.0)
        component, name = places[layer]
        by_component[component][name] = tensors
        labels[name] = f"{layer} ({name})"
    if block_cls is None:
        raise CheckpointError(f"{path} holds no plugin tensors.")
    return install_layers(components, by_component, labels, block_cls, adapter_name, is_trainable, path)


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
