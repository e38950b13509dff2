"""The adapter-set core: several plugin kinds in place on one model, saved and loaded as one *adapter set*.

PEFT's ``PeftModel`` holds adapters of one type, and ``PeftMixedModel`` refuses custom types, so a
model that carries several plugin kinds at once (a LoRA on attention, a ControlNet plugin, a patch)
holds them *in place*: each adapter is injected under its own name with ``inject_adapter_in_model``
(``ModelMixin.add_adapter`` for diffusers models) and the module's ``peft_config`` dict lists them,
as diffusers does. :func:`save_adapter` writes that whole set, :func:`load_adapter` re-creates it.

Layout of a saved set (every leaf folder is a standard PEFT adapter folder)::

    <dir>/adapter_set.json                  # manifest: component, adapter name, subfolder, peft_type
    <dir>/unet/adapter_config.json          # a component holding one adapter
    <dir>/unet/adapter_model.safetensors
    <dir>/text_encoder/style/adapter_config.json   # a component holding several: one folder per name
    <dir>/text_encoder/detail/...

A leaf folder loads alone with ``PeftModel.from_pretrained(unet, dir, subfolder="unet")``. A bare
model's set has the component ``""`` (files directly under ``<dir>``, or ``<dir>/<name>``).
Loading is driven by each folder's ``peft_type``: any registered type works, nothing in the files
names code to import, and weights are read from safetensors only. After a load, the loaded adapters
are active together with the ones that were active before.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from diffusers import ModelMixin
from huggingface_hub import snapshot_download
from peft import (
    PeftConfig,
    PeftModel,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer, set_adapter
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from peft_hcp.base.blocks import BlockLayer
from peft_hcp.base.files import check_adapter_folder, read_safetensors
from peft_hcp.base.sharding import is_main_process as main_process
from peft_hcp.errors import CheckpointError


MANIFEST_NAME = "adapter_set.json"
MANIFEST_FORMAT = "peft-hcp-adapter-set"
#: Pipeline components that may carry plugins, in the order they are saved.
PLUGIN_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class SetEntry:
    """One adapter of a set: where it lives on the model and in the folder."""

    component: str  # "" for a bare model
    name: str
    subfolder: str  # relative to the set's root, "" for the root itself
    peft_type: str


def plugin_components(target: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``target`` that can carry adapters: a pipeline's components, or the model itself."""
    components = getattr(target, "components", None)
    if isinstance(components, dict) and not isinstance(target, nn.Module):
        return {name: components[name] for name in PLUGIN_COMPONENTS if components.get(name) is not None}
    if isinstance(target, nn.Module):
        return {"": target}
    raise TypeError(f"Expected a diffusers pipeline or a torch module, got {type(target).__name__}.")


def adapter_names(module: nn.Module) -> list[str]:
    """Names of the adapters on ``module`` (a ``PeftModel`` or a model adapted in place)."""
    return list(getattr(module, "peft_config", None) or {})


def save_adapter(
    target,
    save_directory: str,
    adapter_names_: Optional[list[str]] = None,
    *,
    is_main_process: Optional[bool] = None,
) -> list[SetEntry]:
    """Save every adapter of a pipeline or model (or only ``adapter_names_``) as an adapter set.

    On a model sharded with FSDP2 every rank calls it (the adapters' tensors are gathered whole, a collective)
    and only ``is_main_process`` writes; it defaults to rank 0 of the default process group (``True`` in one
    process). Returns the entries of the manifest. Raises ``ValueError`` when there is nothing to save.
    """
    writes = is_main_process if is_main_process is not None else main_process()
    entries: list[SetEntry] = []
    for component, module in plugin_components(target).items():
        names = [n for n in adapter_names(module) if adapter_names_ is None or n in adapter_names_]
        for name in names:
            sub = component if len(names) == 1 else "/".join(p for p in (component, name) if p)
            _save_one(module, name, os.path.join(save_directory, sub), writes)
            entries.append(SetEntry(component, name, sub, str(module.peft_config[name].peft_type.value)))
    if not entries:
        wanted = f" named {adapter_names_}" if adapter_names_ else ""
        raise ValueError(f"{type(target).__name__} carries no adapters{wanted} to save.")
    if writes:
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "adapters": [e.__dict__ for e in entries]}
        with open(os.path.join(save_directory, MANIFEST_NAME), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
    return entries


def _save_one(module: nn.Module, name: str, folder: str, writes: bool) -> None:
    state = get_peft_model_state_dict(module, adapter_name=name, save_embedding_layers=False)  # every rank
    if not writes:
        return
    os.makedirs(folder, exist_ok=True)
    config = copy.deepcopy(module.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(folder)
    if not isinstance(module, PeftModel):  # the keys PeftModel.from_pretrained expects
        state = {_PEFT_PREFIX + key: value for key, value in state.items()}
    state = {key: value.detach().contiguous() for key, value in state.items()}
    save_file(state, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def read_set(folder: str) -> list[SetEntry]:
    """The entries of the set in ``folder``: from its manifest, or found by its adapter folders."""
    manifest = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{manifest} is not a peft-hcp adapter set manifest.")
        return [SetEntry(**entry) for entry in data["adapters"]]
    entries = []
    for root, _, files in sorted(os.walk(folder)):
        if CONFIG_NAME not in files:
            continue
        parts = [] if root == folder else os.path.relpath(root, folder).split(os.sep)
        if len(parts) > 2:
            continue
        component = parts[0] if parts and parts[0] in PLUGIN_COMPONENTS else ""
        rest = parts[1:] if component else parts
        name = rest[0] if rest else "default"
        entries.append(SetEntry(component, name, "/".join(parts), _peft_type_of(root)))
    if not entries:
        raise CheckpointError(f"{folder} holds no {CONFIG_NAME} and no {MANIFEST_NAME}: it is not an adapter folder.")
    return entries


def _peft_type_of(folder: str) -> str:
    path = os.path.join(folder, CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        peft_type = json.load(handle).get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise CheckpointError(f"{path} has no 'peft_type': it does not say which adapter type it configures.")
    return peft_type


def resolve_source(
    path_or_repo_id: str,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
) -> str:
    """A local folder as is; a Hub repo id downloaded (configs, safetensors, manifest only) into the cache."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    return snapshot_download(
        path_or_repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=["*.json", "*.safetensors", "*.md"],
    )


def load_adapter(
    target,
    path_or_repo_id: str,
    adapter_name: Union[str, dict[str, str], None] = None,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    is_trainable: bool = False,
    hotswap: bool = False,
) -> list[SetEntry]:
    """Load an adapter set (or a single PEFT adapter folder) into a pipeline or model.

    ``adapter_name`` renames: a string when the set has one adapter name, or a ``{saved: new}`` dict.
    Local folders and Hub repo ids go through the same code (``revision``/``token`` are passed to the
    Hub). Returns the loaded entries, with their names as loaded.

    ``hotswap=True`` copies the set's weights and scales into the adapters of the same names already there, in
    place (also on a compiled model, see :mod:`peft_hcp.hotswap`); every entry is checked before any changes.
    """
    folder = resolve_source(path_or_repo_id, revision, token, cache_dir, local_files_only)
    entries = _renamed(read_set(folder), adapter_name)
    components = plugin_components(target)
    placed = _place(entries, components)
    if hotswap:
        from peft_hcp.hotswap import hotswap_entries  # it builds on this module

        hotswap_entries(placed, folder)
        return [entry for entry, _ in placed]
    for entry, module in placed:
        _load_one(module, entry, os.path.join(folder, entry.subfolder) if entry.subfolder else folder, is_trainable)
    for module in {id(m): m for _, m in placed}.values():
        loaded = [e.name for e, m in placed if m is module]
        previous = active_adapters(module)
        set_adapter(module, list(dict.fromkeys(previous + loaded)), inference_mode=not is_trainable)
    return [entry for entry, _ in placed]


def _renamed(entries: list[SetEntry], adapter_name: Union[str, dict[str, str], None]) -> list[SetEntry]:
    if adapter_name is None:
        return entries
    saved = sorted({e.name for e in entries})
    if isinstance(adapter_name, str):
        if len(saved) != 1:
            raise ValueError(
                f"The adapter set holds several adapter names {saved}; pass adapter_name as a dict "
                "{saved_name: new_name} to rename them."
            )
        adapter_name = {saved[0]: adapter_name}
    unknown = sorted(set(adapter_name) - set(saved))
    if unknown:
        raise ValueError(f"adapter_name renames {unknown}, which the set does not hold; it holds {saved}.")
    return [SetEntry(e.component, adapter_name.get(e.name, e.name), e.subfolder, e.peft_type) for e in entries]


def _place(entries: list[SetEntry], components: dict[str, nn.Module]) -> list[tuple[SetEntry, nn.Module]]:
    """Pair each entry with the module it loads into."""
    if list(components) == [""]:
        saved = sorted({e.component for e in entries})
        if len(saved) > 1:
            raise ValueError(
                f"The adapter set holds adapters for the components {saved}; load it into the pipeline, "
                "not into one model."
            )
        return [(entry, components[""]) for entry in entries]
    missing = sorted({e.component or "<model>" for e in entries if e.component not in components})
    if missing:
        raise ValueError(
            f"The adapter set holds adapters for {missing}, which this pipeline does not have "
            f"(it has {sorted(components)})."
        )
    return [(entry, components[entry.component]) for entry in entries]


def _load_one(module: nn.Module, entry: SetEntry, folder: str, is_trainable: bool) -> None:
    check_adapter_folder(folder)
    if not os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)):
        raise CheckpointError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}.")
    if isinstance(module, PeftModel):
        module.load_adapter(folder, adapter_name=entry.name, is_trainable=is_trainable)
        return
    if entry.name in adapter_names(module):
        raise ValueError(f"{type(module).__name__} already has an adapter named {entry.name!r}; pass adapter_name.")
    config = read_config(folder)
    config.inference_mode = not is_trainable
    attach(module, config, entry.name)
    try:
        load_adapter_weights(module, entry.name, folder)
    except Exception:
        detach(module, entry.name)
        raise


def read_config(folder: str) -> PeftConfig:
    """The config of the adapter folder ``folder``, of the type its own ``adapter_config.json`` names (the
    folder's config is authoritative, not a manifest); the type must be registered in this process."""
    peft_type = _peft_type_of(folder)
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is None:
        raise CheckpointError(
            f"{folder} holds an adapter of type {peft_type!r}, which is not registered in this process. "
            "Import the package that defines it first (`import peft_hcp` for the bundled types)."
        )
    return config_cls.from_pretrained(folder)


def load_adapter_weights(module: nn.Module, adapter_name: str, folder: str) -> None:
    """Load a PEFT adapter folder's weights into adapter ``adapter_name``, already attached in place.

    Strict: peft-hcp tuners refuse missing, unknown and mis-shaped weights (naming them); weights that no
    adapter layer claims are refused here.
    """
    weights = read_safetensors(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    result = set_peft_model_state_dict(module, weights, adapter_name=adapter_name)
    unexpected = list(result.unexpected_keys)
    if unexpected:
        raise CheckpointError(
            f"{folder}: the checkpoint has weights this model's adapter {adapter_name!r} does not have: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def attach(module: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Inject a new adapter into ``module`` in place and record it in ``module.peft_config``.

    diffusers models go through their own ``add_adapter``; other models (a transformers text encoder)
    get the same bookkeeping, which diffusers' pipeline ``set_adapters``/``delete_adapters`` read. The
    adapters active before stay active. A refused attach leaves ``module`` as it was.
    """
    active = active_adapters(module)
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if isinstance(module, ModelMixin):
            module.add_adapter(config, adapter_name)  # a refusal is rolled back by the peft-hcp tuner
        else:
            inject_adapter_in_model(config, module, adapter_name)
            if not isinstance(getattr(module, "peft_config", None), dict):
                module.peft_config = {}
            module.peft_config[adapter_name] = config
            module._hf_peft_config_loaded = True
    if active:
        set_adapter(module, active + [adapter_name], inference_mode=config.inference_mode)


def detach(module: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` attached in place by :func:`attach`, putting the hosts back (idempotent)."""
    _remove_layers_of(module, adapter_name)
    configs = getattr(module, "peft_config", None) or {}
    configs.pop(adapter_name, None)
    if not configs:
        _drop_peft_bookkeeping(module)


def _remove_layers_of(module: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name`` from every tuner layer of ``module``; peft-hcp layers left empty are removed."""
    for name, layer in reversed(list(module.named_modules())):
        if not isinstance(layer, BaseTunerLayer) or adapter_name not in _layer_adapters(layer):
            continue
        layer.delete_adapter(adapter_name)
        if isinstance(layer, BlockLayer) and not layer.blocks:
            layer.remove_from(module, name)


def _layer_adapters(layer: BaseTunerLayer) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {})}


def _drop_peft_bookkeeping(module: nn.Module) -> None:
    if "peft_config" in module.__dict__:
        del module.peft_config
    module._hf_peft_config_loaded = False


def active_adapters(module: nn.Module) -> list[str]:
    """The active adapters of a model adapted in place (those of its first tuner layer)."""
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            return list(layer.active_adapters)
    return []


__all__ = [
    "MANIFEST_NAME",
    "PLUGIN_COMPONENTS",
    "SetEntry",
    "active_adapters",
    "attach",
    "detach",
    "load_adapter",
    "load_adapter_weights",
    "plugin_components",
    "read_config",
    "read_set",
    "resolve_source",
    "save_adapter",
]
