"""What ComfyUI makes of a LoRA file for a diffusers DiT, as a reference for ``export_comfyui`` (ComfyUI is not imported).

ComfyUI patches its own model's weights: ``comfy/lora.py`` ``model_lora_keys_unet`` maps every
``diffusion_model.<key>`` of its model, and ``calculate_weight`` adds each file layer's ``ΔW`` to that weight (or
to a row slice of it, for diffusers' modules ComfyUI holds fused). Which diffusers module is which weight of
ComfyUI's model is the data below, transcribed from ComfyUI's ``comfy/utils.py`` (``flux_to_diffusers``,
``mmdit_to_diffusers``; github.com/comfyanonymous/ComfyUI); SD3.5's ``x_block.attn2`` is the name ComfyUI's MMDiT-X
model gives its second attention (``model_lora_keys_unet`` maps every ``diffusion_model.`` weight of it). Wan's names are checked with diffusers' own
single-file converter instead (``convert_wan_transformer_to_diffusers``), Qwen-Image's are diffusers' names.
``ΔW`` is computed with ``calculate_weight``'s formulas for ``lora``, ``loha`` and ``lokr`` patches.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file
from torch import nn


#: {diffusers module: (ComfyUI weight, first row, rows or None for all, (scale, shift) swapped)}
Target = tuple[str, int, "int | None", bool]

# comfy/utils.py flux_to_diffusers: block_map of a double block, block_map of a single block, MAP_BASIC
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_BASIC = {
    "proj_out": "final_layer.linear",
    "x_embedder": "img_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "context_embedder": "txt_in",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
# comfy/utils.py mmdit_to_diffusers: MMDIT_MAP_BLOCK, MMDIT_MAP_BASIC
_MMDIT_BLOCK = {
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
}
_MMDIT_BASIC = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}


def _fused(targets: dict, block: str, parts: list[str], weight: str, sizes: list[int]) -> None:
    start = 0
    for part, size in zip(parts, sizes):
        targets[f"{block}.{part}"] = (weight, start, size, False)
        start += size


def _joint_blocks(targets: dict, count: int, to: str, qkv: tuple[str, str], block_map: dict, hidden: int) -> None:
    """A double/joint block's fused image and text ``qkv`` (ComfyUI's offsets) and its one-to-one weights."""
    for i in range(count):
        block, prefix = f"transformer_blocks.{i}", f"{to}.{i}"
        _fused(targets, block, ["attn.to_q", "attn.to_k", "attn.to_v"], f"{prefix}.{qkv[0]}", [hidden] * 3)
        add = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
        _fused(targets, block, add, f"{prefix}.{qkv[1]}", [hidden] * 3)
        targets.update({f"{block}.{d}": (f"{prefix}.{c}", 0, None, False) for d, c in block_map.items()})


def flux_targets(model: FluxTransformer2DModel) -> dict[str, Target]:
    hidden = model.inner_dim
    targets: dict[str, Target] = {}
    qkv = ("img_attn.qkv", "txt_attn.qkv")
    _joint_blocks(targets, len(model.transformer_blocks), "double_blocks", qkv, _FLUX_DOUBLE, hidden)
    for i in range(len(model.single_transformer_blocks)):
        block, to = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        _fused(targets, block, parts, f"{to}.linear1", [hidden] * 3 + [hidden * 4])
        targets.update({f"{block}.{d}": (f"{to}.{c}", 0, None, False) for d, c in _FLUX_SINGLE.items()})
    targets.update({d: (c, 0, None, False) for d, c in _FLUX_BASIC.items()})
    targets["norm_out.linear"] = ("final_layer.adaLN_modulation.1", 0, None, True)
    return targets


def mmdit_targets(model: SD3Transformer2DModel) -> dict[str, Target]:
    depth = len(model.transformer_blocks)
    hidden = model.inner_dim  # ComfyUI: depth * 64, the width of SD3's configurations
    targets: dict[str, Target] = {}
    qkv = ("x_block.attn.qkv", "context_block.attn.qkv")
    _joint_blocks(targets, depth, "joint_blocks", qkv, _MMDIT_BLOCK, hidden)
    for i, block in enumerate(model.transformer_blocks):  # SD3.5's MMDiT-X: ComfyUI's model names it attn2
        if block.attn2 is not None:
            to = f"joint_blocks.{i}.x_block.attn2"
            _fused(
                targets,
                f"transformer_blocks.{i}",
                ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
                f"{to}.qkv",
                [hidden] * 3,
            )
            targets[f"transformer_blocks.{i}.attn2.to_out.0"] = (f"{to}.proj", 0, None, False)
    targets.update({d: (c, 0, None, False) for d, c in _MMDIT_BASIC.items()})
    targets["norm_out.linear"] = ("final_layer.adaLN_modulation.1", 0, None, True)
    last = f"transformer_blocks.{depth - 1}.norm1_context.linear"
    targets[last] = (f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1", 0, None, True)
    return targets


def wan_targets(model: WanTransformer3DModel, layers: list[str]) -> dict[str, Target]:
    """Each file layer (Wan's own name) as diffusers' single-file converter renames that weight."""
    targets: dict[str, Target] = {}
    for layer in layers:
        [converted] = convert_wan_transformer_to_diffusers({f"{layer}.weight": torch.zeros(1)})
        targets[converted.removesuffix(".weight")] = (layer, 0, None, False)
    return targets


def comfyui_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ΔW`` of one file layer, flattened to 2-D, by ``calculate_weight``'s formula for its patch type."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "lora_up.weight" in parts:
        up, down = parts["lora_up.weight"].flatten(1), parts["lora_down.weight"].flatten(1)
        return (alpha / up.shape[1] if alpha is not None else 1.0) * (up @ down)
    if "hada_w1_a" in parts:
        w1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
        w2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
        return (alpha / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0) * (w1 * w2)
    dim = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        dim = parts["lokr_w1_b"].shape[0]
        w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        dim = parts["lokr_w2_b"].shape[0]
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    return (alpha / dim if alpha is not None and dim is not None else 1.0) * torch.kron(w1, w2)


def file_layers(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {tensor name: tensor}}`` of a file of ``diffusion_model.`` layers."""
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in load_file(path).items():
        assert key.startswith("diffusion_model."), key
        head, _, last = key.removeprefix("diffusion_model.").rpartition(".")
        layer, part = (
            (head.rpartition(".")[0], f"{head.rpartition('.')[2]}.weight") if last == "weight" else (head, last)
        )
        layers[layer][part] = value
    return layers


def apply_as_comfyui(model: nn.Module, path: str, targets: dict[str, Target]) -> None:
    """Add each ``diffusion_model.`` layer of the file at ``path`` to ``model``'s weights as ComfyUI would.

    Fails, as ComfyUI warns "lora key not loaded", on a file layer its key map does not name.
    """
    layers = file_layers(path)
    by_layer: dict[str, list[tuple[str, int, int | None, bool]]] = defaultdict(list)
    for module, (layer, start, rows, swap) in targets.items():
        by_layer[layer].append((module, start, rows, swap))
    unread = sorted(set(layers) - set(by_layer))
    assert not unread, f"ComfyUI's key map does not name {unread}"
    with torch.no_grad():
        for layer, parts in layers.items():
            delta = comfyui_delta(parts)
            for module, start, rows, swap in by_layer[layer]:
                weight = model.get_submodule(module).weight
                piece = delta[start : start + (rows or delta.shape[0])]
                if swap:
                    piece = torch.cat(piece.chunk(2)[::-1])
                weight += piece.reshape(weight.shape)
