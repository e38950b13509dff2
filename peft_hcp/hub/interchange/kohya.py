"""kohya/webui and LyCORIS files (the format of sd-scripts, the SD web UIs and civitai), both ways.

One safetensors file holds a whole network: per layer the tensors of one low-rank variant under its
kohya/LyCORIS names (``lora_down.weight`` / ``lora_up.weight``, ``hada_w1_a`` …) and ``alpha``; a layer is
scaled by ``alpha / rank``. Which layer of the model a file layer is, diffusers' own converter says
(:mod:`.stock`), for import and for the check of every export; exports are named with :mod:`.names`.
What each variant's tensors are, and how it builds itself from them, the block declares
(:class:`~peft_hcp.single.lowrank.LowRankBlock`): this module dispatches on it, so a variant registered
in ``adapters/`` imports and exports with no change here.

Import builds one config per pipeline component and variant from the variant's
``config_kwargs_from_kohya``: the most frequent rank, alpha (and LoKr structure) of the file's layers, and
PEFT-style ``rank_pattern`` / ``alpha_pattern`` (LoKr: ``structure_pattern``) entries for the layers that
differ, so every layer is rebuilt as the file has it and the whole file is one adapter. Unknown layers,
unknown tensor sets and shape mismatches are refused by name, and a refused import leaves the model as it
was. Files are read with safetensors only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from peft.tuners.tuners_utils import set_adapter
from safetensors.torch import save_file
from torch import nn

from peft_hcp.adapter_set import active_adapters, attach
from peft_hcp.adapter_set import adapter_names as names_on
from peft_hcp.base.config import PEFT_HCP_VERSION
from peft_hcp.base.files import read_safetensors
from peft_hcp.base.names import check_adapter_name
from peft_hcp.base.preflight import rehearse
from peft_hcp.base.snapshot import all_or_nothing
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import CheckpointError, few
from peft_hcp.hub.interchange.blocks import file_variant, lowrank_blocks, one_block_per_layer
from peft_hcp.hub.interchange.comfyui import comfyui_layers_of_file, reads_comfyui_layout
from peft_hcp.hub.interchange.names import kohya_name_table, kohya_prefixes
from peft_hcp.hub.interchange.stock import (
    check_placement,
    interchange_components,
    loader_class,
    lora_through_diffusers,
    stock_targets,
)
from peft_hcp.single.lowrank import LowRankBlock, lowrank_type_of, lowrank_types


#: how LyCORIS's own wrapper (``create_lycoris(model)``) names a bare model's layers: ``lycoris_<module path>``
_LYCORIS = "lycoris_"
#: how kohya/LyCORIS layer names start (``lora_unet_…``, ``lora_te1_…``, ``lycoris_…``)
_KOHYA_STARTS = ("lora_", _LYCORIS)


def export_kohya(target, path: str, adapter_names: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Write the low-rank adapters of a pipeline, model or ``PeftModel`` (default: all) to one kohya/LyCORIS file.

    Before writing, the file's layer names go through diffusers' own converter (:mod:`.stock`): a file
    whose layers the stock loader would not put back where they came from is refused, naming them.
    """
    components = interchange_components(target)
    prefixes = kohya_prefixes(components)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}
    for component, module in components.items():
        blocks = one_block_per_layer(module, adapter_names, "kohya file")
        if component not in prefixes:  # Wan 2.2's transformer_2: kohya has no name for a second denoiser
            if blocks:
                raise ValueError(
                    f"A kohya file has no names for {component!r}; export its adapters with "
                    f"export_comfyui(pipe, path, component={component!r})."
                )
            continue
        layer_of = {name: layer for layer, name in kohya_name_table(module, prefixes[component]).items()}
        for name, block in blocks.items():
            layer = layer_of[name]
            origin[layer] = (component, name)
            try:
                tensors.update({f"{layer}.{key}": value for key, value in block.kohya_tensors().items()})
            except ValueError as exc:
                raise ValueError(f"{layer}: {exc}") from exc
    if not tensors:
        raise ValueError(f"{type(target).__name__} has no low-rank adapters to export.")
    check_placement(origin, loader_class(target, components), components)
    kind = (
        "networks.lora"
        if all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in tensors)
        else "lycoris.kohya"
    )
    save_file(tensors, path, metadata={"ss_network_module": kind, "peft_hcp_version": PEFT_HCP_VERSION})
    return tensors


def import_kohya(
    target,
    path: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    alpha_is_scale: bool = False,
    component: Optional[str] = None,
) -> dict[str, list[str]]:
    """Load a kohya/webui/LyCORIS file into a pipeline or model as adapter ``adapter_name``.

    A LoRA file with no kohya layer names (``lora_…``) is read whole by diffusers' converter: diffusers'
    own layout, ai-toolkit and the other layouts its ``lora_state_dict`` reads. A file of ``diffusion_model.``
    layers on a Flux, SD3, Wan or Qwen-Image model is ComfyUI's layout (:mod:`.comfyui`), any variant, alphas read.

    Layers are placed where diffusers' own loader places them (:mod:`.stock`): SD 1.x/2.x and SDXL names
    (SGM ``input_blocks`` included), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` with or without
    ``text_model_``. ``alpha_is_scale``: the file's ``alpha`` is the layer's scale itself, not
    ``alpha / rank`` (HCP-Diffusion's webui export). Returns ``{component: [adapted module names]}``. A
    file mixing variants (LoRA on some layers, LoHa on others) is refused: import one variant per file.

    ``component="transformer_2"`` puts a transformer's file on Wan 2.2's second transformer, as diffusers'
    ``load_lora_weights(file, load_into_transformer_2=True)`` does.
    """
    if component not in (None, "transformer_2"):
        raise ValueError(f"component={component!r}: only 'transformer_2' (Wan 2.2) is chosen by hand.")
    components = interchange_components(target)
    loader = loader_class(target, components)
    if component is None:
        return _import_kohya(path, loader, components, adapter_name, is_trainable, alpha_is_scale)
    into = {"transformer": _second_transformer(target, components)}
    return {component: _import_kohya(path, loader, into, adapter_name, is_trainable, alpha_is_scale)["transformer"]}


def _import_kohya(
    path: str,
    loader: type,
    components: dict[str, nn.Module],
    adapter_name: str,
    is_trainable: bool,
    alpha_is_scale: bool,
) -> dict[str, list[str]]:
    state = read_safetensors(path)
    if reads_comfyui_layout(state, components):  # diffusion_model.<original name> of a DiT, alphas included
        placed = comfyui_layers_of_file(state, path, components, alpha_is_scale)
        return install_layers(components, *placed, adapter_name, is_trainable, path)
    if state and not any(key.startswith(_KOHYA_STARTS) for key in state):
        return _import_diffusers_layout(state, path, loader, components, adapter_name, is_trainable)
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        layer, _, suffix = key.partition(".")
        layers[layer][suffix] = value
    rows = {layer: max(v.shape[0] for k, v in parts.items() if k != "alpha") for layer, parts in layers.items()}
    places = _lycoris_places(path, [layer for layer in layers if layer.startswith(_LYCORIS)], components)
    if len(places) < len(layers):
        rest = [layer for layer in layers if layer not in places]
        places.update(stock_targets(rest, loader, components, rows=rows))
    unknown = sorted(layer for layer in layers if layer not in places)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} layer(s) match no layer of this {'/'.join(components)}: {few(unknown)}."
        )
    block_cls = file_variant(layers, path, alpha_is_scale)

    fused = {layer: parts for layer, parts in layers.items() if len(places[layer]) != 1}
    if fused and not block_cls.matches_kohya({"lora_down.weight", "lora_up.weight"}):
        raise CheckpointError(
            f"{path}: layers {few(sorted(fused))} each stand for several layers of the model (fused); only LoRA "
            f"splits exactly, not {block_cls.__name__}."
        )
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    labels: dict[str, str] = {}  # module name -> how errors name the layer
    for layer, parts in layers.items():
        if layer not in fused:
            [(component, name)] = places[layer]
            by_component[component][name] = parts
            labels[name] = f"{layer} ({name})"
    if fused:
        flat = {f"{layer}.{part}": value for layer, parts in fused.items() for part, value in parts.items()}
        for (component, name), parts in lora_through_diffusers(flat, loader, components).items():
            by_component[component][name] = parts
            labels[name] = f"a split fused layer ({name})"
    return install_layers(components, by_component, labels, block_cls, adapter_name, is_trainable, path)


def _lycoris_places(path: str, layers: list[str], components: dict[str, nn.Module]) -> dict[str, list[tuple[str, str]]]:
    """Where ``lycoris_…`` layers go: the one component whose layers they all name (no stock loader reads them).

    LyCORIS names the layers of the model it wrapped, whichever it was, so the file does not say which component
    that was; a file whose layers fit no component, or several, is refused.
    """
    if not layers:
        return {}
    tables = {component: kohya_name_table(module, _LYCORIS[:-1]) for component, module in components.items()}
    unknown = [layer for layer in layers if not any(layer in table for table in tables.values())]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} LyCORIS layer(s) match no layer of this {'/'.join(components)}: {few(unknown)}."
        )
    fits = [component for component, table in tables.items() if all(layer in table for layer in layers)]
    if len(fits) != 1:
        raise CheckpointError(
            f"{path}: its LyCORIS layers (lycoris_…, the names of one wrapped model) fit "
            f"{'each of ' + ', '.join(fits) if fits else 'no single component'}; import it onto that model alone."
        )
    return {layer: [(fits[0], tables[fits[0]][layer])] for layer in layers}


def _second_transformer(target, components: dict[str, nn.Module]) -> nn.Module:
    """Wan 2.2's ``transformer_2``, which files name as ``transformer`` (diffusers' ``load_into_transformer_2``)."""
    if "transformer_2" not in components:
        raise ValueError(
            f"{type(target).__name__} has no transformer_2 (Wan 2.2's pipelines have one, Wan 2.1's do not)."
        )
    return components["transformer_2"]


def _import_diffusers_layout(
    state: dict[str, torch.Tensor],
    path: str,
    loader: type,
    components: dict[str, nn.Module],
    adapter_name: str,
    is_trainable: bool,
) -> dict[str, list[str]]:
    alphas = sorted(key for key in state if key.endswith(".alpha"))
    if alphas:
        raise CheckpointError(f"{path}: alphas outside kohya names are not read ({few(alphas)}).")
    try:
        modules = lora_through_diffusers(state, loader, components)
    except (ValueError, KeyError, AssertionError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: diffusers' {loader.__name__} cannot read it: {exc}") from exc
    if not modules:
        raise CheckpointError(f"{path}: diffusers' {loader.__name__} places none of its layers on this model.")
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    for (component, name), parts in modules.items():
        by_component[component][name] = parts
    block_cls = lowrank_type_of({"lora_down.weight", "lora_up.weight"}, "LoRA", path)
    labels = {name: name for _, name in modules}
    return install_layers(components, by_component, labels, block_cls, adapter_name, is_trainable, path)


def install_layers(
    components: dict[str, nn.Module],
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]],
    labels: dict[str, str],
    block_cls: type[LowRankBlock],
    adapter_name: str,
    is_trainable: bool,
    source: str = "the imported file",
) -> dict[str, list[str]]:
    """Attach ``adapter_name`` of ``block_cls`` on each component and load its layers' kohya tensors.

    All or nothing: the install is rehearsed on meta twins first (:func:`~peft_hcp.base.preflight.rehearse`),
    so a file whose layers do not fit the blocks their config builds (``source`` names it) is refused before
    anything is allocated; a layer refused later leaves every component as it was.
    """
    check_adapter_name(adapter_name)
    for component in by_component:
        if adapter_name in names_on(components[component]):
            raise ValueError(f"{component} already has an adapter named {adapter_name!r}.")

    def rehearsal(twins: list[nn.Module]) -> None:  # the same install on meta twins: a misfit allocates nothing
        for parts_by_name, twin in zip(by_component.values(), twins):
            _install(twin, parts_by_name, labels, block_cls, adapter_name, is_trainable)

    size = sum(len(parts) for parts_by_name in by_component.values() for parts in parts_by_name.values())
    rehearse([components[component] for component in by_component], rehearsal, source, size)
    with all_or_nothing(*(components[component] for component in by_component)):
        for component, parts_by_name in by_component.items():
            _install(components[component], parts_by_name, labels, block_cls, adapter_name, is_trainable)
    return {component: sorted(parts) for component, parts in by_component.items()}


def _install(
    module: nn.Module,
    parts_by_name: dict[str, dict[str, torch.Tensor]],
    labels: dict[str, str],
    block_cls: type[LowRankBlock],
    adapter_name: str,
    is_trainable: bool,
) -> None:
    config_cls = lowrank_types()[block_cls]
    hosts = {name: base_module(module.get_submodule(name)) for name in parts_by_name}
    kwargs = block_cls.config_kwargs_from_kohya(parts_by_name, hosts)
    config = config_cls(target_modules=sorted(parts_by_name), init_weights=False, **kwargs)
    previous = active_adapters(module)
    attach(module, config, adapter_name)
    blocks = {name: block for name, adapter, block in lowrank_blocks(module, [adapter_name])}
    for name, parts in parts_by_name.items():
        blocks[name].load_kohya(parts, labels[name])
    set_adapter(module, list(dict.fromkeys(previous + [adapter_name])), inference_mode=not is_trainable)
