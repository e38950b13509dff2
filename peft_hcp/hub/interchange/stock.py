"""What diffusers' own LoRA loader makes of layer names: the one name mapping import and export share.

diffusers converts every community format it reads (kohya/webui SD and SDXL, SGM ``input_blocks``
names, ``lora_te1_`` / ``lora_te2_``, text encoders with or without ``text_model.``, Flux kohya /
xlabs / ai-toolkit …) in the pipeline classes' public ``lora_state_dict``, then to PEFT's names on load.
peft-hcp does not keep a second table: it asks that converter where each file layer goes by feeding it
one tagged 1x1 LoRA per layer (the tag survives the renaming), which also names the layers of LyCORIS
variants (LoHa, LoKr …) that diffusers does not read itself. Export runs the same mapping on what it
wrote and refuses a file whose layers the stock loader would put elsewhere, or nowhere.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import torch
from diffusers import FluxTransformer2DModel, ModelMixin, SD3Transformer2DModel
from diffusers.loaders import (
    FluxLoraLoaderMixin,
    SD3LoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import PeftModel
from torch import nn

from peft_hcp.base.components import DENOISERS, pipeline_components
from peft_hcp.errors import CheckpointError, few
from peft_hcp.hub.interchange.blocks import host_layer


_LORA_A = ".lora_A.weight"
#: a CLIP layer named without ``text_model_``, as LyCORIS names it under transformers 5; diffusers' converter
#: reads only the older names (it maps ``…_self_attn_q_proj`` nowhere without it), so the level is put back
_CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?_)(embeddings|encoder|final_layer_norm)_")


def interchange_components(target) -> dict[str, nn.Module]:
    """``{component: model}`` as diffusers names them; a ``PeftModel`` is looked through to its model.

    A bare model is named after its role: ``unet`` (a UNet), ``transformer`` (another diffusers model),
    ``text_encoder`` (anything else).
    """
    components = pipeline_components(target)
    if list(components) == [""]:
        model = components[""]
        model = model.get_base_model() if isinstance(model, PeftModel) else model
        if not isinstance(model, ModelMixin):
            return {"text_encoder": model}
        return {"unet" if hasattr(model, "up_blocks") else "transformer": model}
    return {name: m.get_base_model() if isinstance(m, PeftModel) else m for name, m in components.items()}


def loader_class(target, components: dict[str, nn.Module]) -> type:
    """The diffusers class whose ``lora_state_dict`` reads files for ``target``."""
    if hasattr(type(target), "lora_state_dict"):
        return type(target)
    denoiser = next((components[name] for name in DENOISERS if name in components), None)
    if isinstance(denoiser, FluxTransformer2DModel):
        return FluxLoraLoaderMixin
    if isinstance(denoiser, SD3Transformer2DModel):
        return SD3LoraLoaderMixin
    return StableDiffusionXLLoraLoaderMixin  # SD 1.x/2.x and SDXL files, UNet and CLIP text encoders


def stock_targets(
    layers: list[str],
    loader: type,
    components: dict[str, nn.Module],
    diffusers_layout: bool = False,
    rows: Optional[dict[str, int]] = None,
) -> dict[str, list[tuple[str, str]]]:
    """``{file layer: [(component, module name), ...]}`` as the stock loader would place each layer.

    Layers are kohya/LyCORIS names, or with ``diffusers_layout`` diffusers' ``<component>.<module>``. A
    layer the converter drops, or places on no layer of ``components``, is missing from the result; a
    fused layer (Flux's ``qkv``) maps to several modules. ``rows``: a layer's output features, where the
    converter splits fused layers by size (Flux's single-block ``linear1``).
    """
    rows = rows or {}
    down, up = ("lora_A.weight", "lora_B.weight") if diffusers_layout else ("lora_down.weight", "lora_up.weight")
    probe: dict[str, torch.Tensor] = {}
    for tag, layer in enumerate(layers, start=1):
        name = layer if diffusers_layout else _CLIP_WITHOUT_TEXT_MODEL.sub(r"\1text_model_\2_", layer)
        probe[f"{name}.{down}"] = torch.full((1, 1), float(tag))
        probe[f"{name}.{up}"] = torch.ones(rows.get(layer, 3), 1)  # split evenly into up to three by default
        if not diffusers_layout:
            probe[f"{name}.alpha"] = torch.tensor(1.0)
    # as load_lora_weights passes it: SGM (``input_blocks``) names are mapped by the UNet's layout
    kwargs = {"unet_config": components["unet"].config} if "unet" in components else {}
    try:
        converted = loader.lora_state_dict(probe, **kwargs)
    except (ValueError, KeyError, AssertionError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"diffusers' {loader.__name__} cannot read these layer names: {exc}") from exc
    state = converted[0] if isinstance(converted, tuple) else converted
    places: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for component, name, tag in _peft_lora_a(state, components):
        places[layers[tag - 1]].append((component, name))
    return dict(places)


def _peft_lora_a(state: dict[str, torch.Tensor], components: dict[str, nn.Module]):
    """``(component, module name, tag)`` of each ``lora_A`` that loads onto a layer of ``components``."""
    for component, name, down, _, placed in peft_lora_layers(state, components):
        if placed:
            yield component, name, round(float(down.flatten()[0]))


def peft_lora_layers(state: dict[str, torch.Tensor], components: dict[str, nn.Module]):
    """``(component, module name, lora_A, lora_B, placed)`` of what ``lora_state_dict`` returned, under PEFT's
    names (as diffusers' loader renames them); ``placed``: the name is a layer of ``components``."""
    by_component: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        component, _, rest = key.partition(".")
        by_component[component][rest] = value
    for component, sub in by_component.items():
        model = components.get(component)
        if model is None:
            for key, value in sub.items():
                if "lora_A" in key or ".down." in key:
                    yield component, key, value, None, False
            continue
        if component in DENOISERS:
            sub = sub if any("lora_A" in k for k in sub) else convert_unet_state_dict_to_peft(sub)
        else:
            if not any("lora_A" in k for k in sub):
                # diffusers infers the old processor names (``to_q_lora``) only from an ``out_proj`` among them
                sub = convert_state_dict_to_diffusers(sub, original_type=StateDictType.DIFFUSERS_OLD)
            sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
            if not hasattr(model, "text_model"):  # transformers 5 CLIP, as diffusers' loader does
                sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        for key, value in sub.items():
            name = key[: -len(_LORA_A)]
            if key.endswith(_LORA_A):
                yield component, name, value, sub.get(f"{name}.lora_B.weight"), _has_layer(model, name)


def lora_through_diffusers(
    state: dict[str, torch.Tensor], loader: type, components: dict[str, nn.Module]
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """kohya LoRA tensors per ``(component, module)`` of a LoRA ``state`` as diffusers' converter reads it.

    For layers diffusers converts with their scale folded in (Flux's fused ``qkv`` split into ``to_q`` /
    ``to_k`` / ``to_v``) and files in a layout diffusers reads whole (its own, ai-toolkit …): each module
    gets ``alpha = rank``, a scale of 1. A scale the converter hands back separately is refused, not dropped.
    """
    converted = loader.lora_state_dict(state)
    alphas = converted[1] if isinstance(converted, tuple) and len(converted) > 1 else None
    if alphas:
        raise CheckpointError(
            f"diffusers' {loader.__name__} keeps alphas apart for {few(sorted(alphas))}; not supported."
        )
    converted = converted[0] if isinstance(converted, tuple) else converted
    layers = list(peft_lora_layers(converted, components))
    lost = sorted(f"{component}.{name}" for component, name, _, _, placed in layers if not placed)
    if lost:
        raise CheckpointError(f"{len(lost)} LoRA layer(s) match no layer of this {'/'.join(components)}: {few(lost)}.")
    return {
        (component, name): {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}
        for component, name, down, up, _ in layers
    }


def _has_layer(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(host_layer(model, name), (nn.Linear, nn.Conv2d))
    except AttributeError:
        return False


def check_placement(
    written: dict[str, tuple[str, str]], loader: type, components: dict[str, nn.Module], diffusers_layout: bool = False
) -> None:
    """Refuse (``ValueError`` naming the layers) when the stock loader would not put every written layer
    (``{file layer: (component, module)}``) exactly where it came from."""
    places = stock_targets(list(written), loader, components, diffusers_layout)
    fmt = "diffusers" if diffusers_layout else "kohya"
    wrong = sorted(layer for layer, origin in written.items() if places.get(layer) != [origin])
    if wrong:
        raise ValueError(
            f"diffusers' {loader.__name__} would not load {len(wrong)} layer(s) of this {fmt} export onto the "
            f"layers they come from: {few(wrong)}. Nothing was written."
        )
