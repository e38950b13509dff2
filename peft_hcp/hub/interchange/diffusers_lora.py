"""diffusers' LoRA layout, which stock ``pipe.load_lora_weights(folder)`` loads.

Keys are ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``.

* :func:`export_diffusers` writes any low-rank variant with an exact LoRA form (LoRA, LoHa as a rank r² LoRA)
  with each block's scale folded into ``lora_B``: outputs match, the HCP ``alpha`` is not kept. A variant with no
  exact LoRA form (a LoRA with a bias, LoKr, DoRA …) is refused, naming it.
* :func:`save_diffusers_lora` writes a set of plain LoRAs as diffusers' own ``save_lora_weights`` writes a trained
  LoRA: the factors as they are, with diffusers' ``lora_adapter_metadata`` (``r``, ``lora_alpha``, per-layer
  ``rank_pattern`` / ``alpha_pattern``), from which the stock loader builds the same ``LoraConfig``.
  :func:`~peft_hcp.adapter_set.save_adapter` writes it beside every set it can hold.

Both refuse a file whose layers the stock loader would not place where they came from (:mod:`.stock`).
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Iterator
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from peft_hcp.adapter_set import DIFFUSERS_LORA_NAME
from peft_hcp.adapter_set import adapter_names as adapter_names_on
from peft_hcp.base.components import pipeline_components
from peft_hcp.base.sharding import full_tensors
from peft_hcp.hub.interchange.blocks import host_layer, lowrank_blocks, one_block_per_layer
from peft_hcp.hub.interchange.stock import (
    check_placement,
    interchange_components,
    loader_class,
)
from peft_hcp.single.lowrank import LowRankBlock, pattern_key


#: the file name ``load_lora_weights`` looks for in a folder
LORA_WEIGHT_NAME = DIFFUSERS_LORA_NAME
_LORA_TENSORS = {"lora_down.weight", "lora_up.weight", "alpha"}


def export_diffusers(target, save_directory: str, adapter_names: Optional[list[str]] = None) -> str:
    """Write the LoRA/LoHa adapters of a pipeline, model or ``PeftModel`` to ``save_directory`` in diffusers' layout."""
    components = interchange_components(target)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}
    for component, name, block in _blocks(components, adapter_names):
        down, up = block.lora_factors(host_layer(components[component], name))
        tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        origin[f"{component}.{name}"] = (component, name)
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no low-rank adapters to export.")
    check_placement(origin, loader_class(target, components), components, diffusers_layout=True)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, LORA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def save_diffusers_lora(
    target, save_directory: str, adapter_names: Optional[list[str]] = None, *, is_main_process: bool = True
) -> str:
    """Write the plain LoRA adapters of a pipeline or model as diffusers' ``save_lora_weights`` does, rank and alpha
    kept in its ``lora_adapter_metadata``; the adapters of a component become one diffusers adapter.

    ``ValueError`` (nothing written) where stock ``load_lora_weights`` could not rebuild them: an adapter that is
    not a plain LoRA (LoHa, DoRA, a LoRA bias), two adapters on one layer, a component the pipeline's
    ``save_lora_weights`` has no place for, layers it would place elsewhere.

    On a model sharded with FSDP2 every rank calls it (the tensors are gathered whole) and only
    ``is_main_process`` writes.
    """
    components = interchange_components(target)
    for component, module in zip(components, pipeline_components(target).values()):
        lowrank = {adapter for _, adapter, _ in lowrank_blocks(components[component], adapter_names)}
        other = [
            n for n in adapter_names_on(module) if n not in lowrank and (adapter_names is None or n in adapter_names)
        ]
        if other:
            raise ValueError(f"{component}: adapters {other} are no low-rank adapters.")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict] = {}
    origin: dict[str, tuple[str, str]] = {}
    for component, name, block in _blocks(components, adapter_names):
        tensors = full_tensors(block.kohya_tensors())  # every rank, in the same order
        if set(tensors) != _LORA_TENSORS:
            raise ValueError(f"{component}.{name}: a {type(block).__name__} is no plain LoRA.")
        layers.setdefault(component, {})[f"{name}.lora_A.weight"] = tensors["lora_down.weight"].contiguous()
        layers[component][f"{name}.lora_B.weight"] = tensors["lora_up.weight"].contiguous()
        metadata.setdefault(component, {})[name] = (int(tensors["lora_down.weight"].shape[0]), float(tensors["alpha"]))
        origin[f"{component}.{name}"] = (component, name)
    if not layers:
        raise ValueError(f"{type(target).__name__} has no LoRA adapters to save in diffusers' layout.")
    loader = loader_class(target, components)
    check_placement(origin, loader, components, diffusers_layout=True)
    accepted = inspect.signature(loader.save_lora_weights).parameters
    kwargs: dict[str, object] = {}
    for component, component_layers in layers.items():
        if f"{component}_lora_layers" not in accepted:
            raise ValueError(f"diffusers' {loader.__name__}.save_lora_weights has no place for {component!r}.")
        kwargs[f"{component}_lora_layers"] = component_layers
        kwargs[f"{component}_lora_adapter_metadata"] = lora_adapter_metadata(metadata[component])
    if is_main_process:  # diffusers' writer leaves that to its caller
        loader.save_lora_weights(save_directory, weight_name=LORA_WEIGHT_NAME, **kwargs)
    return os.path.join(save_directory, LORA_WEIGHT_NAME)


def lora_adapter_metadata(ranks_alphas: dict[str, tuple[int, float]]) -> dict:
    """The ``LoraConfig`` fields diffusers keeps as a component's adapter metadata, for ``{module: (rank, alpha)}``:
    the most common rank and alpha, the others in ``rank_pattern`` / ``alpha_pattern`` (PEFT's meaning)."""
    r = Counter(rank for rank, _ in ranks_alphas.values()).most_common(1)[0][0]
    lora_alpha = Counter(alpha for _, alpha in ranks_alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {pattern_key(n, ranks_alphas): rank for n, (rank, _) in ranks_alphas.items() if rank != r},
        "alpha_pattern": {
            pattern_key(n, ranks_alphas): alpha for n, (_, alpha) in ranks_alphas.items() if alpha != lora_alpha
        },
        "target_modules": sorted(ranks_alphas),
    }


def _blocks(
    components: dict[str, nn.Module], adapter_names: Optional[list[str]]
) -> Iterator[tuple[str, str, LowRankBlock]]:
    """``(component, module name, block)`` of every low-rank block; two adapters on one layer are refused."""
    for component, module in components.items():
        for name, block in one_block_per_layer(module, adapter_names, "diffusers LoRA file").items():
            yield component, name, block
