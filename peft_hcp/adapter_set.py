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
    <dir>/pytorch_lora_weights.safetensors  # a set of plain LoRAs only: the same, for stock diffusers

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
from typing import Optional, Union

import torch
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
from peft_hcp.base.components import pipeline_components
from peft_hcp.base.config import HcpConfig
from peft_hcp.base.files import check_adapter_folder, read_header, read_safetensors
from peft_hcp.base.fit import mismatch_error
from peft_hcp.base.names import check_adapter_name, is_inside
from peft_hcp.base.preflight import blamed_on, fit_header, rehearse
from peft_hcp.base.sharding import is_main_process as main_process
from peft_hcp.base.snapshot import all_or_nothing
from peft_hcp.errors import CheckpointError
from peft_hcp.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PLUGIN_COMPONENTS,
    SetEntry,
    peft_type_of,
    read_set,
)


_PEFT_PREFIX = "base_model.model."
#: the file stock diffusers' ``load_lora_weights`` reads from a folder, written beside a set it can load
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


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

    Returns the entries written to the manifest. Raises ``ValueError`` when there is nothing to save, and,
    before writing anything, when an adapter name is not a plain name or a file would land outside
    ``save_directory`` (a symbolic link already there).

    On a model sharded with FSDP2 every rank calls it (the adapters' tensors are gathered whole, a collective)
    and only ``is_main_process`` writes; it defaults to rank 0 of the default process group (``True`` in one
    process).
    """
    writes = is_main_process if is_main_process is not None else main_process()
    planned: list[tuple[nn.Module, SetEntry]] = []
    for component, module in pipeline_components(target).items():
        names = [n for n in adapter_names(module) if adapter_names_ is None or n in adapter_names_]
        for name in names:
            check_adapter_name(name)
            sub = component if len(names) == 1 else "/".join(p for p in (component, name) if p)
            planned.append((module, SetEntry(component, name, sub, str(module.peft_config[name].peft_type.value))))
    if not planned:
        wanted = f" named {adapter_names_}" if adapter_names_ else ""
        raise ValueError(f"{type(target).__name__} carries no adapters{wanted} to save.")
    files = [MANIFEST_NAME, DIFFUSERS_LORA_NAME] + [
        os.path.join(entry.subfolder, name) for _, entry in planned for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
    ]
    outside = [f for f in files if not is_inside(save_directory, os.path.join(save_directory, f))]
    if outside:
        raise ValueError(f"Saving to {save_directory} would write {outside[0]} outside it (a symbolic link?).")
    for module, entry in planned:
        _save_one(module, entry.name, os.path.join(save_directory, entry.subfolder), writes)
    entries = [entry for _, entry in planned]
    if writes:
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "adapters": [e.__dict__ for e in entries]}
        with open(os.path.join(save_directory, MANIFEST_NAME), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
    _save_for_stock_diffusers(target, save_directory, adapter_names_, writes)  # every rank
    return entries


def _save_for_stock_diffusers(
    target, save_directory: str, adapter_names_: Optional[list[str]], is_main_process: bool
) -> None:
    """Write the set also as diffusers' ``pytorch_lora_weights.safetensors`` when stock ``load_lora_weights`` can
    rebuild it (plain LoRAs on the denoiser and text encoders); otherwise remove one an earlier save left there, which
    would load other weights. peft-hcp never reads that file."""
    from peft_hcp.hub.interchange.diffusers_lora import save_diffusers_lora  # it builds on this module

    try:
        save_diffusers_lora(target, save_directory, adapter_names_, is_main_process=is_main_process)
    except (ValueError, CheckpointError):
        stale = os.path.join(save_directory, DIFFUSERS_LORA_NAME)
        if is_main_process and os.path.isfile(stale):
            os.remove(stale)


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
        ignore_patterns=[DIFFUSERS_LORA_NAME],  # for stock diffusers; peft-hcp does not read it
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
    Hub). Returns the loaded entries, with their names as loaded. All or nothing: an entry that is refused
    (its weights do not fit, its type is unknown) leaves the pipeline or model as it was.

    ``hotswap=True`` copies the set's weights and scales into the adapters of the same names already there, in
    place (also on a compiled model, see :mod:`peft_hcp.hotswap`); every entry is checked before any changes.
    """
    folder = resolve_source(path_or_repo_id, revision, token, cache_dir, local_files_only)
    entries = _renamed(read_set(folder), adapter_name)
    components = pipeline_components(target)
    placed = _place(entries, components)
    if hotswap:
        from peft_hcp.hotswap import hotswap_entries  # it builds on this module

        hotswap_entries(placed, folder)
        return [entry for entry, _ in placed]
    leaves = [os.path.join(folder, entry.subfolder) if entry.subfolder else folder for entry, _ in placed]
    configs = _check_set(placed, leaves, folder)  # every leaf against its weights, before anything is attached
    modules = list(dict.fromkeys(m for _, m in placed))
    loaded_into = [w for e, m in placed if e.name in adapter_names(m) for w in _adapter_weights(m, e.name)]
    with all_or_nothing(*modules, values=loaded_into):  # a refused entry takes the ones before it back
        for (entry, module), leaf, config in zip(placed, leaves, configs):
            _load_one(module, entry, leaf, config, is_trainable)
        for module in modules:
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
            raise CheckpointError(
                f"The adapter set holds adapters for the components {saved}; load it into the pipeline, "
                "not into one model."
            )
        return [(entry, components[""]) for entry in entries]
    missing = sorted({e.component or "<model>" for e in entries if e.component not in components})
    if missing:
        raise CheckpointError(
            f"The adapter set holds adapters for {missing}, which this pipeline does not have "
            f"(it has {sorted(components)})."
        )
    return [(entry, components[entry.component]) for entry in entries]


def _check_set(placed: list[tuple[SetEntry, nn.Module]], leaves: list[str], folder: str) -> list[Optional[PeftConfig]]:
    """Check every leaf folder, and rehearse every config against its weights file, before anything is attached.

    The configs are attached in order to meta twins of their modules (:mod:`peft_hcp.base.preflight`), so a set
    that does not fit, in any leaf, is refused whole with the model as it was. Returns each leaf's config
    (``None`` for a ``PeftModel``, which reads its folder itself and is checked as it attaches).
    """
    for entry, _ in placed:
        check_adapter_name(entry.name)  # a name given by adapter_name=
    configs = [_leaf_config(module, entry, leaf) for (entry, module), leaf in zip(placed, leaves)]
    checked = [
        (entry, module, config, leaf) for (entry, module), leaf, config in zip(placed, leaves, configs) if config
    ]
    headers = [read_header(os.path.join(leaf, SAFETENSORS_WEIGHTS_NAME)) for *_, leaf in checked]
    modules = list({id(module): module for _, module, *_ in checked}.values())

    def step(twins: list[nn.Module]) -> None:
        twin_of = {id(module): twin for module, twin in zip(modules, twins)}
        for (entry, module, config, leaf), header in zip(checked, headers):
            path = os.path.join(leaf, SAFETENSORS_WEIGHTS_NAME)
            with blamed_on(path):
                fit_header(twin_of[id(module)], config, entry.name, header, path)

    rehearse(modules, step, folder, sum(map(len, headers)))
    return configs


def _leaf_config(module: nn.Module, entry: SetEntry, folder: str) -> Optional[PeftConfig]:
    """Check one leaf folder and read its config (``None`` for a ``PeftModel``, which reads it itself)."""
    check_adapter_folder(folder)
    if not os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)):
        raise CheckpointError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}.")
    if isinstance(module, PeftModel):
        return None
    if entry.name in adapter_names(module):
        raise ValueError(f"{type(module).__name__} already has an adapter named {entry.name!r}; pass adapter_name.")
    config = read_config(folder)
    if isinstance(config, HcpConfig):
        config.checkpoint_file = None  # checked with the whole set (_check_set)
    return config


def _load_one(
    module: nn.Module, entry: SetEntry, folder: str, config: Optional[PeftConfig], is_trainable: bool
) -> None:
    if config is None:
        module.load_adapter(folder, adapter_name=entry.name, is_trainable=is_trainable)
        return
    config.inference_mode = not is_trainable
    attach(module, config, entry.name)
    load_adapter_weights(module, entry.name, folder)


def read_config(folder: str) -> PeftConfig:
    """The config of the adapter folder ``folder``, of the type its own ``adapter_config.json`` names (the
    folder's config is authoritative, not a manifest); the type must be registered in this process, and a
    config file whose values do not make a config is a ``CheckpointError``."""
    peft_type = peft_type_of(folder)
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is None:
        raise CheckpointError(
            f"{folder} holds an adapter of type {peft_type!r}, which is not registered in this process. "
            "Import the package that defines it first (`import peft_hcp` for the bundled types)."
        )
    try:
        return config_cls.from_pretrained(folder)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:  # PEFT's own types: a value its config refuses
        raise CheckpointError(f"{folder}/{CONFIG_NAME}: cannot be read as a {config_cls.__name__}: {exc}") from exc


def load_adapter_weights(module: nn.Module, adapter_name: str, folder: str) -> None:
    """Load a PEFT adapter folder's weights into adapter ``adapter_name``, already attached in place.

    Strict: peft-hcp tuners refuse missing, unknown and mis-shaped weights (naming them) before copying any;
    weights that no adapter layer claims are refused here, the adapter's weights put back as they were.
    """
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    weights = read_safetensors(path)
    with all_or_nothing(module, values=_adapter_weights(module, adapter_name)):
        result = set_peft_model_state_dict(module, weights, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise mismatch_error(path, f"this model's adapter {adapter_name!r}", unexpected=result.unexpected_keys)


def _adapter_weights(module: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """The tensors of adapter ``adapter_name`` of ``module`` (those a load into it writes)."""
    return list(get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False).values())


def attach(module: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Inject a new adapter into ``module`` in place and record it in ``module.peft_config``.

    diffusers models go through their own ``add_adapter``; other models (a transformers text encoder)
    get the same bookkeeping, which diffusers' pipeline ``set_adapters``/``delete_adapters`` read. The
    adapters active before stay active. A refused attach leaves ``module`` as it was; ``adapter_name`` must be
    a plain name (:func:`~peft_hcp.base.names.check_adapter_name`).
    """
    check_adapter_name(adapter_name)
    active = active_adapters(module)
    with all_or_nothing(module), warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if isinstance(module, ModelMixin):
            module.add_adapter(config, adapter_name)
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
    "read_config",
    "read_set",
    "resolve_source",
    "save_adapter",
]
