"""kohya/webui LoRA files (the format of sd-scripts, the SD web UIs and civitai), both ways.

One safetensors file holds a whole network: ``<layer>.lora_down.weight``, ``<layer>.lora_up.weight``
and ``<layer>.alpha`` per layer (LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``,
``alpha``), with layer names from :mod:`.names`. kohya scales a layer by ``alpha / rank``.

Export writes each block's effective scale as ``alpha = scale * rank``. Import builds one
``HcpLoraConfig`` (or ``HcpLohaConfig``) per pipeline component: ``r`` is the largest rank in the file
and ``alpha`` that of its layers, so a file with one rank and one alpha (the usual case) round-trips
exactly; a layer of lower rank is zero-padded and a layer of another ``alpha / rank`` has that ratio
folded into its up weight, which keeps every layer's output exact. Unknown keys, unknown layers,
incomplete layers and shape mismatches are refused by name. Files are read with safetensors only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from peft.tuners.tuners_utils import set_adapter
from safetensors.torch import load_file, save_file
from torch import nn

from peft_hcp import __version__
from peft_hcp.adapters.loha import HcpLohaConfig
from peft_hcp.adapters.lora import HcpLoraConfig, LoraBlock
from peft_hcp.adapters.lowrank import host_shape
from peft_hcp.checkpoint import check_safetensors_file
from peft_hcp.errors import CheckpointError
from peft_hcp.hub.adapter_set import _active_adapters, adapter_names as names_on, attach, plugin_components
from peft_hcp.hub.interchange.blocks import host_layer, lowrank_blocks
from peft_hcp.hub.interchange.names import kohya_name_table, kohya_prefixes

LORA_KEYS = ("lora_down.weight", "lora_up.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
KNOWN_SUFFIXES = frozenset(LORA_KEYS + LOHA_KEYS + ("alpha",))


def export_kohya(target, path: str, adapter_names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Write the LoRA/LoHa adapters of a pipeline or model (default: all of them) to one kohya file."""
    components = plugin_components(target)
    prefixes = kohya_prefixes(components)
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for component, module in components.items():
        layer_of = {name: layer for layer, name in kohya_name_table(module, prefixes[component]).items()}
        for name, adapter, block in lowrank_blocks(module, adapter_names):
            layer = layer_of[name]
            if layer in owner:
                raise ValueError(
                    f"Adapters {owner[layer]!r} and {adapter!r} both adapt {name!r}; a kohya file holds one "
                    "network per layer. Export them one at a time (adapter_names=[...])."
                )
            owner[layer] = adapter
            tensors.update(_block_tensors(layer, block))
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no LoRA or LoHa adapters to export.")
    kind = "lycoris.kohya" if any(k.endswith("hada_w1_a") for k in tensors) else "networks.lora"
    save_file(tensors, path, metadata={"ss_network_module": kind, "peft_hcp_version": __version__})
    return tensors


def _block_tensors(layer: str, block: nn.Module) -> dict[str, torch.Tensor]:
    alpha = torch.tensor(float(block.base_scaling * block.rank))
    if isinstance(block, LoraBlock):
        if block.lora_up.bias is not None:
            raise ValueError(f"{layer}: the kohya format has no LoRA bias; train without lora_bias to export.")
        return {
            f"{layer}.lora_down.weight": block.lora_down.weight.detach().clone(),
            f"{layer}.lora_up.weight": block.lora_up.weight.detach().clone(),
            f"{layer}.alpha": alpha,
        }
    if block.rank_groups != 2:
        raise ValueError(f"{layer}: the kohya/LyCORIS LoHa format has two pairs; this block has {block.rank_groups}.")
    tensors = {f"{layer}.{key}": getattr(block, key).detach().clone() for key in LOHA_KEYS}
    tensors[f"{layer}.alpha"] = alpha
    return tensors


def import_kohya(target, path: str, adapter_name: str = "default", is_trainable: bool = False) -> dict[str, list[str]]:
    """Load a kohya/webui LoRA or LoHa file into a pipeline or model as adapter ``adapter_name``.

    Returns ``{component: [adapted module names]}``.
    """
    check_safetensors_file(path)
    state = load_file(path)
    components = plugin_components(target)
    prefixes = kohya_prefixes(components)
    tables = {c: kohya_name_table(m, prefixes[c]) for c, m in components.items()}
    where = {layer: (c, name) for c, table in tables.items() for layer, name in table.items()}

    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bad_suffix = []
    for key, value in state.items():
        layer, _, suffix = key.partition(".")
        if suffix not in KNOWN_SUFFIXES:
            bad_suffix.append(key)
        layers[layer][suffix] = value
    if bad_suffix:
        raise CheckpointError(f"{path}: unknown keys (not LoRA/LoHa weights): {_few(bad_suffix)}.")
    unknown = sorted(layer for layer in layers if layer not in where)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} layer(s) match no layer of this {'/'.join(components) or 'model'}: {_few(unknown)}."
        )
    kinds = {_kind(layer, parts, path) for layer, parts in layers.items()}
    if len(kinds) != 1:
        raise CheckpointError(f"{path} mixes LoRA and LoHa layers; import one kind per file.")
    kind = kinds.pop()

    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    for layer, parts in layers.items():
        component, name = where[layer]
        _check_shapes(layer, parts, host_layer(components[component], name), kind)
        by_component[component][name] = parts
    for component, parts_by_name in by_component.items():
        module = components[component]
        if adapter_name in names_on(module):
            raise ValueError(f"{component or 'The model'} already has an adapter named {adapter_name!r}.")
    for component, parts_by_name in by_component.items():
        _install(components[component], parts_by_name, kind, adapter_name, is_trainable)
    return {component: sorted(parts) for component, parts in by_component.items()}


def _kind(layer: str, parts: dict[str, torch.Tensor], path: str) -> str:
    for kind, needed in (("lora", LORA_KEYS), ("loha", LOHA_KEYS)):
        present = [k for k in needed if k in parts]
        if present and len(present) != len(needed):
            missing = [k for k in needed if k not in parts]
            raise CheckpointError(f"{path}: layer {layer} is incomplete, missing {missing}.")
        if present:
            other = set(parts) - set(needed) - {"alpha"}
            if other:
                raise CheckpointError(f"{path}: layer {layer} mixes LoRA and LoHa weights: {sorted(other)}.")
            return kind
    raise CheckpointError(f"{path}: layer {layer} has only {sorted(parts)}, no weights.")


def _rank(parts: dict[str, torch.Tensor], kind: str) -> int:
    return parts["lora_down.weight"].shape[0] if kind == "lora" else parts["hada_w1_b"].shape[0]


def _check_shapes(layer: str, parts: dict[str, torch.Tensor], host: nn.Module, kind: str) -> None:
    in_features, out_features = host_shape(host)
    kernel = tuple(host.kernel_size) if isinstance(host, nn.Conv2d) else ()
    rank = _rank(parts, kind)
    if kind == "lora":
        ones = (1,) * len(kernel)
        expected = {"lora_down.weight": (rank, in_features, *kernel), "lora_up.weight": (out_features, rank, *ones)}
    else:
        fan_in = in_features * int(torch.tensor(kernel).prod()) if kernel else in_features
        expected = {"hada_w1_a": (out_features, rank), "hada_w2_a": (out_features, rank)}
        expected.update({"hada_w1_b": (rank, fan_in), "hada_w2_b": (rank, fan_in)})
    wrong = [f"{key} {tuple(parts[key].shape)} (the layer needs {shape})" for key, shape in expected.items()
             if tuple(parts[key].shape) != shape]
    if "alpha" in parts and parts["alpha"].numel() != 1:
        wrong.append(f"alpha {tuple(parts['alpha'].shape)} (a scalar is needed)")
    if wrong:
        raise CheckpointError(f"Shape mismatch in layer {layer} ({type(host).__name__}): " + "; ".join(wrong))


def _install(module: nn.Module, parts_by_name: dict, kind: str, adapter_name: str, is_trainable: bool) -> None:
    ranks = {name: _rank(parts, kind) for name, parts in parts_by_name.items()}
    scales = {name: float(parts.get("alpha", torch.tensor(ranks[name]))) / ranks[name] for name, parts in parts_by_name.items()}
    first = next(iter(parts_by_name))
    rank = max(ranks.values())
    alpha = scales[first] * rank if ranks[first] != rank else float(parts_by_name[first].get("alpha", rank))
    config_cls = HcpLoraConfig if kind == "lora" else HcpLohaConfig
    config = config_cls(target_modules=sorted(parts_by_name), r=rank, alpha=alpha, init_weights=False)
    previous = _active_adapters(module)
    attach(module, config, adapter_name)
    blocks = {name: block for name, adapter, block in lowrank_blocks(module, [adapter_name])}
    with torch.no_grad():
        for name, parts in parts_by_name.items():
            block = blocks[name]
            fold = scales[name] / block.base_scaling
            if kind == "lora":
                _pad_copy(block.lora_down.weight, parts["lora_down.weight"], dim=0)
                _pad_copy(block.lora_up.weight, parts["lora_up.weight"] * fold, dim=1)
            else:
                _pad_copy(block.hada_w1_a, parts["hada_w1_a"] * fold, dim=1)
                _pad_copy(block.hada_w2_a, parts["hada_w2_a"], dim=1)
                _pad_copy(block.hada_w1_b, parts["hada_w1_b"], dim=0)
                _pad_copy(block.hada_w2_b, parts["hada_w2_b"], dim=0)
    set_adapter(module, list(dict.fromkeys(previous + [adapter_name])), inference_mode=not is_trainable)


def _pad_copy(param: torch.Tensor, value: torch.Tensor, dim: int) -> None:
    """Copy ``value`` into the leading slice of ``param`` along ``dim`` (the rank) and zero the rest."""
    param.zero_()
    param.narrow(dim, 0, value.shape[dim]).copy_(value.to(param.dtype))


def _few(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

