"""ComfyUI's LoRA layouts for DiTs, both ways: ``diffusion_model.<original module name>.<kohya/LyCORIS tensor>``.

ComfyUI names a DiT's layers as the model's original checkpoint does (its ``model_lora_keys_unet`` maps
``diffusion_model.<key>`` for every weight of its own model), and its maintainer adds no new formats in
diffusers' names. The original names per family (:data:`FAMILIES`):

* Flux: BFL names; ``to_q/to_k/to_v`` are one ``qkv`` layer and a single block's q/k/v and ``proj_mlp`` one
  ``linear1`` (ComfyUI's ``flux_to_diffusers``, diffusers' ``_convert_kohya_flux_lora_to_diffusers``);
* SD3: MMDiT ``joint_blocks.N.{x,context}_block`` names with fused ``qkv`` (ComfyUI's ``mmdit_to_diffusers``,
  diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``);
* Wan 2.1/2.2: its original names (diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers``);
* Qwen-Image: diffusers' own module names (ComfyUI's model is a port under the same names).

A fused layer is written as one LoRA that equals its parts: the ``lora_down`` of the parts stacked, their
``lora_up`` block-diagonal (diffusers splits such a file back exactly); only LoRA fuses so. Where the
original layout orders an AdaLN projection's rows ``(scale, shift)`` and diffusers ``(shift, scale)``
(``AdaLayerNormContinuous``), the rows are swapped. Where diffusers' converter drops an ``alpha`` (Wan outside
its blocks, Flux's final layer) the scale is folded into the weights and no alpha written. SD 1.x/SDXL
UNets and CLIP text encoders keep kohya names, which ComfyUI reads (:mod:`.kohya`, :mod:`.names`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from diffusers import (
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.normalization import AdaLayerNormContinuous
from safetensors.torch import save_file
from torch import nn

from peft_hcp.base.components import DENOISERS
from peft_hcp.base.config import PEFT_HCP_VERSION
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import CheckpointError, few
from peft_hcp.hub.interchange.blocks import file_variant, host_layer, one_block_per_layer
from peft_hcp.hub.interchange.names import kohya_name_table, kohya_prefixes
from peft_hcp.hub.interchange.stock import interchange_components
from peft_hcp.selectors import selectable_modules
from peft_hcp.single.lowrank import LowRankBlock


#: how errors name the file this module writes
_FILE = "ComfyUI file"
#: how ComfyUI's layer names of a diffusion model start
PREFIX = "diffusion_model."
_LORA = ("lora_down.weight", "lora_up.weight")
#: diffusers' names of a LoRA's factors, as ai-toolkit and musubi write them under ComfyUI's layer names
_DIFFUSERS_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


@dataclass(frozen=True)
class Family:
    """One DiT family's ComfyUI names: per block list, ``{original suffix: diffusers modules}``; then the rest.

    A suffix standing for several modules is a fused layer whose rows are those modules' outputs in order.
    """

    name: str
    blocks: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = field(default_factory=dict)
    top: dict[str, str] = field(default_factory=dict)
    identity: bool = False  # the original names are diffusers' own
    fold_alpha: tuple[str, ...] = ()  # original names (prefixes) where diffusers' converter drops the alpha
    swap_halves: bool = False  # AdaLayerNormContinuous rows are (scale, shift) in the original layout


@dataclass(frozen=True)
class Layer:
    """One layer of a ComfyUI file: its original name and the modules of the diffusers model it stands for."""

    name: str
    modules: tuple[str, ...]
    swap_halves: bool
    fold_alpha: bool


_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

FAMILIES: dict[type, Family] = {
    FluxTransformer2DModel: Family(
        "Flux",
        blocks={
            "transformer_blocks": (
                "double_blocks",
                {
                    "img_attn.qkv": tuple(f"attn.{m}" for m in _QKV),
                    "txt_attn.qkv": tuple(f"attn.{m}" for m in _ADD_QKV),
                    "img_attn.proj": ("attn.to_out.0",),
                    "txt_attn.proj": ("attn.to_add_out",),
                    "img_mod.lin": ("norm1.linear",),
                    "txt_mod.lin": ("norm1_context.linear",),
                    "img_mlp.0": ("ff.net.0.proj",),
                    "img_mlp.2": ("ff.net.2",),
                    "txt_mlp.0": ("ff_context.net.0.proj",),
                    "txt_mlp.2": ("ff_context.net.2",),
                },
            ),
            "single_transformer_blocks": (
                "single_blocks",
                {
                    "linear1": (*(f"attn.{m}" for m in _QKV), "proj_mlp"),
                    "linear2": ("proj_out",),
                    "modulation.lin": ("norm.linear",),
                },
            ),
        },
        top={
            "img_in": "x_embedder",
            "txt_in": "context_embedder",
            "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
            "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
            "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
            "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
            "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
            "final_layer.linear": "proj_out",
            "final_layer.adaLN_modulation.1": "norm_out.linear",
        },
        fold_alpha=("final_layer.",),
        swap_halves=True,
    ),
    SD3Transformer2DModel: Family(
        "SD3",
        blocks={
            "transformer_blocks": (
                "joint_blocks",
                {
                    "x_block.attn.qkv": tuple(f"attn.{m}" for m in _QKV),
                    "context_block.attn.qkv": tuple(f"attn.{m}" for m in _ADD_QKV),
                    "x_block.attn.proj": ("attn.to_out.0",),
                    "context_block.attn.proj": ("attn.to_add_out",),
                    "x_block.attn2.qkv": tuple(f"attn2.{m}" for m in _QKV),
                    "x_block.attn2.proj": ("attn2.to_out.0",),
                    "x_block.mlp.fc1": ("ff.net.0.proj",),
                    "x_block.mlp.fc2": ("ff.net.2",),
                    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
                    "context_block.mlp.fc2": ("ff_context.net.2",),
                    "x_block.adaLN_modulation.1": ("norm1.linear",),
                    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
                },
            ),
        },
        top={
            "x_embedder.proj": "pos_embed.proj",
            "context_embedder": "context_embedder",
            "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
            "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
            "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
            "final_layer.linear": "proj_out",
            "final_layer.adaLN_modulation.1": "norm_out.linear",
        },
        swap_halves=True,
    ),
    WanTransformer3DModel: Family(
        "Wan",
        blocks={
            "blocks": (
                "blocks",
                {
                    **{f"self_attn.{o}": (f"attn1.{d}",) for o, d in zip("qkvo", (*_QKV, "to_out.0"))},
                    **{f"cross_attn.{o}": (f"attn2.{d}",) for o, d in zip("qkvo", (*_QKV, "to_out.0"))},
                    "cross_attn.k_img": ("attn2.add_k_proj",),
                    "cross_attn.v_img": ("attn2.add_v_proj",),
                    "ffn.0": ("ffn.net.0.proj",),
                    "ffn.2": ("ffn.net.2",),
                },
            ),
        },
        top={
            "text_embedding.0": "condition_embedder.text_embedder.linear_1",
            "text_embedding.2": "condition_embedder.text_embedder.linear_2",
            "time_embedding.0": "condition_embedder.time_embedder.linear_1",
            "time_embedding.2": "condition_embedder.time_embedder.linear_2",
            "time_projection.1": "condition_embedder.time_proj",
            "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
            "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
            "head.head": "proj_out",
        },
        fold_alpha=("text_embedding.", "time_embedding.", "time_projection.", "img_emb.", "head."),
    ),
    QwenImageTransformer2DModel: Family("Qwen-Image", identity=True),
}


def family_of(model: nn.Module) -> Optional[Family]:
    """The ComfyUI layout of a diffusers DiT, or ``None`` (a UNet, or a model ComfyUI's layouts do not cover)."""
    return next((family for cls, family in FAMILIES.items() if isinstance(model, cls)), None)


def comfyui_layers(model: nn.Module, family: Family) -> list[Layer]:
    """Every layer ComfyUI's layout of ``family`` names on ``model`` (fused ones where all their parts exist)."""
    linear = {name for name, m in selectable_modules(model) if isinstance(base_module(m), (nn.Linear, nn.Conv2d))}
    if family.identity:
        return [Layer(name, (name,), False, False) for name in sorted(linear)]
    named: list[tuple[str, tuple[str, ...]]] = [(orig, (module,)) for orig, module in family.top.items()]
    for blocks, (orig_blocks, suffixes) in family.blocks.items():
        for index in range(len(getattr(model, blocks, ()))):
            for orig, parts in suffixes.items():
                named.append((f"{orig_blocks}.{index}.{orig}", tuple(f"{blocks}.{index}.{p}" for p in parts)))
    return [
        Layer(
            orig,
            modules,
            family.swap_halves and _in_continuous_norm(model, modules[0]),
            orig.startswith(family.fold_alpha),
        )
        for orig, modules in named
        if all(m in linear for m in modules)
    ]


def _in_continuous_norm(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(base_module(model.get_submodule(parent)), AdaLayerNormContinuous)


# -- export --------------------------------------------------------------------------------------


def export_comfyui(
    target, path: str, adapter_names: Optional[list[str]] = None, component: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """Write the low-rank adapters of a pipeline, model or ``PeftModel`` to one file in ComfyUI's layout.

    DiTs (Flux, SD3, Wan, Qwen-Image) get ``diffusion_model.`` names of their original layout, CLIP text encoders
    and SD 1.x/SDXL UNets kohya names (:func:`~peft_hcp.hub.interchange.export_kohya`). LoHa, LoKr and DoRA are
    written under LyCORIS' tensor names. A variant a layer cannot hold (LoHa on a fused ``qkv``, a LoRA bias) is
    refused, naming it and the layer; nothing is written then.

    ComfyUI loads each of Wan 2.2's two experts as a model of its own, with a file of its own:
    ``component="transformer_2"`` writes the second expert's file, ``component="transformer"`` the first's with the
    text encoders; without ``component``, adapters on the second expert are refused rather than left out.
    """
    components = interchange_components(target)  # Wan 2.2's transformer_2 too
    first = next((c for c in DENOISERS if c in components), None)
    name = component or first
    if name is not None and name not in components:
        raise ValueError(f"{type(target).__name__} has no component {name!r}.")
    family = family_of(components[name]) if name is not None else None
    if name is None or family is None:
        from peft_hcp.hub.interchange.kohya import export_kohya  # kohya.py reads ComfyUI files through this module

        return export_kohya(target, path, adapter_names)
    others = [c for c in components if c != name and not c.startswith("text_encoder")]
    left = [c for c in others if one_block_per_layer(components[c], adapter_names, _FILE)]
    if left and component is None:  # named by hand, the other denoisers' files are the caller's next calls
        raise ValueError(
            f"{', '.join(left)} also carries adapters; ComfyUI loads each denoiser with a file of its own: export "
            f"them with component={left[0]!r}."
        )
    tensors = _denoiser_tensors(components[name], family, adapter_names)
    if name == first:  # the text encoders go with the first denoiser's file
        tensors.update(_text_encoder_tensors(components, family, adapter_names))
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no low-rank adapters to export.")
    kind = "networks.lora" if all(k.endswith((*_LORA, ".alpha")) for k in tensors) else "lycoris.kohya"
    save_file(tensors, path, metadata={"ss_network_module": kind, "peft_hcp_version": PEFT_HCP_VERSION})
    return tensors


def _denoiser_tensors(model: nn.Module, family: Family, adapter_names: Optional[list[str]]) -> dict[str, torch.Tensor]:
    blocks = one_block_per_layer(model, adapter_names, _FILE)
    layers = comfyui_layers(model, family)
    named = {module for layer in layers for module in layer.modules}
    unnamed = sorted(set(blocks) - named)
    if unnamed:
        raise ValueError(f"ComfyUI's {family.name} layout has no name for the adapted layers {few(unnamed)}.")
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        present = [m for m in layer.modules if m in blocks]
        if not present:
            continue
        try:
            if len(layer.modules) == 1:
                parts = blocks[present[0]].kohya_tensors()
            else:
                parts = _fused_lora(layer, {m: blocks[m] for m in present}, model)
            if layer.swap_halves:
                parts = _swap_halves(parts, layer.name)
            if layer.fold_alpha:
                parts = _fold_alpha(parts, blocks[present[0]].scale_weight, type(blocks[present[0]]))
        except ValueError as exc:
            raise ValueError(f"{PREFIX}{layer.name} ({', '.join(present)}): {exc}") from exc
        tensors.update({f"{PREFIX}{layer.name}.{key}": value.contiguous() for key, value in parts.items()})
    return tensors


def _text_encoder_tensors(
    components: dict[str, nn.Module], family: Family, adapter_names: Optional[list[str]]
) -> dict[str, torch.Tensor]:
    """CLIP text encoders under kohya names (``lora_te1_…``), as ComfyUI's ``model_lora_keys_clip`` reads them."""
    encoders = _text_encoders(components)
    prefixes = kohya_prefixes(encoders)
    tensors: dict[str, torch.Tensor] = {}
    for component, model in encoders.items():
        blocks = one_block_per_layer(model, adapter_names, _FILE)
        if not blocks:
            continue
        if not type(model).__name__.startswith("CLIPTextModel"):
            raise ValueError(
                f"ComfyUI's {family.name} layout has no names for adapters on {component} "
                f"({type(model).__name__}); only CLIP text encoders are written (kohya names)."
            )
        layer_of = {name: layer for layer, name in kohya_name_table(model, prefixes[component]).items()}
        for name, block in blocks.items():
            try:
                parts = block.kohya_tensors()
            except ValueError as exc:
                raise ValueError(f"{layer_of[name]}: {exc}") from exc
            tensors.update({f"{layer_of[name]}.{key}": value for key, value in parts.items()})
    return tensors


def _text_encoders(components: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {name: model for name, model in components.items() if name.startswith("text_encoder")}


def _fused_lora(layer: Layer, blocks: dict[str, LowRankBlock], model: nn.Module) -> dict[str, torch.Tensor]:
    """One LoRA equal to the LoRAs of a fused layer's parts: downs stacked, ups block-diagonal (a part with no
    adapter gives zero rows). The parts' scales stay in ``alpha`` when they share one, else go into the ups."""
    parts = {}
    for module, block in blocks.items():
        tensors = block.kohya_tensors()
        if set(tensors) != {*_LORA, "alpha"}:
            variant = "DoRA" if "dora_scale" in tensors else type(block).__name__
            raise ValueError(
                f"{variant} cannot be fused into one layer; only a plain LoRA on {', '.join(layer.modules)} can."
            )
        parts[module] = tensors
    scales = {float(t["alpha"]) / t["lora_down.weight"].shape[0] for t in parts.values()}
    shared = scales.pop() if len(scales) == 1 else None
    downs, ups = [], []
    for module in layer.modules:
        lora = parts.get(module)
        if lora is None:
            ups.append(torch.zeros(_rows(model, module), 0))
            continue
        down, up = lora["lora_down.weight"], lora["lora_up.weight"]
        scale = float(lora["alpha"]) / down.shape[0]
        downs.append(down)
        ups.append(up if shared is not None else up * scale)
    down = torch.cat(downs)
    up = torch.block_diag(*(u.to(down.dtype) for u in ups))
    return {
        "lora_down.weight": down,
        "lora_up.weight": up,
        "alpha": torch.tensor((1.0 if shared is None else shared) * down.shape[0]),
    }


def _rows(model: nn.Module, name: str) -> int:
    weight = host_layer(model, name).weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def _swap_halves(tensors: dict[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """Swap the two halves of the output rows (an involution: it also undoes itself on import)."""
    rows = {"lora_up.weight", "hada_w1_a", "hada_w2_a"} & set(tensors)
    if not rows or set(tensors) - {*_LORA, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}:
        raise ValueError(f"{layer} orders its rows (scale, shift): only LoRA and LoHa reorder exactly.")
    return {k: torch.cat(v.chunk(2)[::-1]) if k in rows else v for k, v in tensors.items()}


def _fold_alpha(
    tensors: dict[str, torch.Tensor], scale_weight: str, block_cls: type[LowRankBlock]
) -> dict[str, torch.Tensor]:
    """The layer's scale folded into ``scale_weight`` and no ``alpha`` (which readers then take as scale 1)."""
    scale = block_cls.kohya_scale(tensors)
    return {k: v * scale if k == scale_weight else v for k, v in tensors.items() if k != "alpha"}


# -- import --------------------------------------------------------------------------------------


def reads_comfyui_layout(state: dict[str, torch.Tensor], components: dict[str, nn.Module]) -> bool:
    """Whether ``state`` holds ``diffusion_model.`` layers for a DiT of :data:`FAMILIES` among ``components``."""
    denoiser = next((components[name] for name in DENOISERS if name in components), None)
    return denoiser is not None and family_of(denoiser) is not None and any(k.startswith(PREFIX) for k in state)


def comfyui_layers_of_file(
    state: dict[str, torch.Tensor], path: str, components: dict[str, nn.Module], alpha_is_scale: bool = False
) -> tuple[dict[str, dict[str, dict[str, torch.Tensor]]], dict[str, str], type[LowRankBlock]]:
    """``({component: {module: kohya tensors}}, labels, variant)`` of a ComfyUI-layout file.

    ``diffusion_model.`` layers are placed by the denoiser's family table (fused LoRA layers split exactly,
    swapped rows put back), other layers by the kohya names of the CLIP text encoders. Layers no table names,
    and files mixing variants, are refused by name.
    """
    denoiser_name = next(name for name in DENOISERS if name in components)
    denoiser = components[denoiser_name]
    family = family_of(denoiser)
    assert family is not None
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        layer, part = _split_key(key)
        layers[layer][_DIFFUSERS_FACTORS.get(part, part)] = value
    table = {PREFIX + layer.name: layer for layer in comfyui_layers(denoiser, family)}
    encoders = _text_encoders(components)
    text_names = {
        layer: (component, name)
        for component, prefix in kohya_prefixes(encoders).items()
        for layer, name in kohya_name_table(encoders[component], prefix).items()
    }
    unknown = sorted(layer for layer in layers if layer not in table and layer not in text_names)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} layer(s) match no layer of ComfyUI's {family.name} layout on this "
            f"{'/'.join(components)}: {few(unknown)}."
        )
    block_cls = file_variant(layers, path, alpha_is_scale)
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    labels: dict[str, str] = {}
    for name, parts in layers.items():
        if name in text_names:
            component, module = text_names[name]
            by_component[component][module] = parts
            labels[module] = f"{name} ({module})"
            continue
        entry = table[name]
        if entry.swap_halves:
            try:
                parts = _swap_halves(parts, name)
            except ValueError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
        split = {entry.modules[0]: parts} if len(entry.modules) == 1 else _split_fused(entry, parts, denoiser, path)
        for module, tensors in split.items():
            by_component[denoiser_name][module] = tensors
            labels[module] = f"{name} ({module})"
    return by_component, labels, block_cls


def _split_key(key: str) -> tuple[str, str]:
    """``(layer, tensor name)``; tensor names with a dot are the LoRA factors' ``….weight``."""
    head, _, last = key.rpartition(".")
    if last == "weight":
        layer, _, factor = head.rpartition(".")
        return layer, f"{factor}.weight"
    return head, last


def _split_fused(
    layer: Layer, parts: dict[str, torch.Tensor], model: nn.Module, path: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA of each part of a fused layer: its rows of ``lora_up`` and the rank columns they use, so a
    block-diagonal file gives each part its own rank back; a part with all-zero rows gets no adapter."""
    if set(parts) - {"alpha"} != set(_LORA):
        raise CheckpointError(
            f"{path}: layer {PREFIX}{layer.name} stands for {', '.join(layer.modules)} (fused); only LoRA splits "
            f"exactly, it holds {sorted(parts)}."
        )
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    sizes = [_rows(model, module) for module in layer.modules]
    if sum(sizes) != up.shape[0]:
        raise CheckpointError(
            f"{path}: layer {PREFIX}{layer.name} has {up.shape[0]} output rows; its parts {', '.join(layer.modules)} "
            f"have {sum(sizes)}."
        )
    split = {}
    for module, rows in zip(layer.modules, up.split(sizes)):
        used = rows.abs().sum(0) != 0
        if used.any():
            split[module] = {
                "lora_down.weight": down[used],
                "lora_up.weight": rows[:, used],
                "alpha": torch.tensor(alpha * int(used.sum()) / rank),
            }
    return split
