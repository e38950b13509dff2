"""``plugin_unet:`` / ``plugin_TE:`` config sections -> PEFT adapters and optimizer parameter groups.

An entry is written as in HCP-Diffusion's guide::

    plugin_unet:
      lora1:
        _target_: peft_hcp.adapters.lora.LoraBlock   # or LoraBlock, HcpLoraConfig, hcp_lora, ....wrap_model
        _partial_: True
        lr: 1e-4
        alpha: 0.5
        layers: ['re:.*\\.attn.?$', 're:.*\\.ff$']

Security rule: ``_target_`` is a *name*, never an import path. It is looked up among the peft-hcp types
registered in this process (``import peft_hcp`` registers the bundled ones; a plugin package registers
its own when the user imports it): the config class, the plugin block class or its ``wrap_model``, by
dotted path or by class name (so HCP-Diffusion's ``model_plugin.LoraBlock`` finds ``LoraBlock``), or the
type name (``hcp_lora``). Nothing named in a config file is imported or called, and
``hydra.utils.instantiate`` is not used. A name that is not registered is an error.

Each entry becomes one adapter named after the entry, attached in place (several kinds on one model);
its parameters form one optimizer group with the entry's ``lr``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from peft_hcp.adapter_set import attach
from peft_hcp.base.config import HcpConfig

#: Config sections and the pipeline component each one adapts.
SECTIONS = {"plugin_unet": "unet", "plugin_TE": "text_encoder"}
#: HCP-Diffusion class names whose peft-hcp classes are named differently.
HCP_ALIASES = {"Skip": "hcp_skip", "LohaLayer": "hcp_loha", "LoraLayer": "hcp_lora"}
#: HCP-Diffusion parameter names -> peft-hcp config field names.
PARAM_ALIASES = {"rank": "r"}
_KEYS = ("_target_", "_partial_", "lr")


class PluginConfigError(ValueError):
    """A ``plugin_unet`` / ``plugin_TE`` entry that cannot be turned into an adapter."""


@dataclass
class PluginEntry:
    """One configured plugin: where it goes, its PEFT config and its learning rate."""

    section: str
    name: str
    config: PeftConfig  # an HcpConfig from a file; any PEFT config when built in code
    lr: float

    @property
    def component(self) -> str:
        return SECTIONS[self.section]

    @property
    def label(self) -> str:
        return f"{self.section}.{self.name}"


def registered_targets() -> dict[str, type[HcpConfig]]:
    """Every name a ``_target_`` may use, mapped to its registered peft-hcp config class."""
    names: dict[str, type[HcpConfig]] = {}
    by_type: dict[str, type[HcpConfig]] = {}
    for config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.values():
        if not (isinstance(config_cls, type) and issubclass(config_cls, HcpConfig)):
            continue
        by_type[config_cls.type_name] = config_cls
        names[config_cls.type_name] = config_cls
        for cls in (config_cls, getattr(config_cls, "plugin_cls", None)):
            if cls is None:
                continue
            for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):
                names[name] = config_cls
                names[name + ".wrap_model"] = config_cls
    for alias, type_name in HCP_ALIASES.items():
        if type_name in by_type:
            names.setdefault(alias, by_type[type_name])
            names.setdefault(alias + ".wrap_model", by_type[type_name])
    return names


def resolve_target(target: Any, label: str) -> type[HcpConfig]:
    """The config class ``target`` names (see the module docstring); never imports anything."""
    if not isinstance(target, str) or not target:
        raise PluginConfigError(f"{label}: _target_ must be a plugin class name, got {target!r}.")
    names = registered_targets()
    if target in names:
        return names[target]
    parts = target.split(".")
    short = ".".join(parts[-2:]) if parts[-1] == "wrap_model" and len(parts) > 1 else parts[-1]
    if short in names:
        return names[short]
    known = sorted({n for n in names if "." not in n})
    raise PluginConfigError(
        f"{label}: _target_ {target!r} is not a registered peft-hcp plugin. Only registered types can be "
        f"built from a config (nothing named in a file is imported); known: {known}."
    )


def parse_section(section: str, entries: Any) -> list[PluginEntry]:
    """The entries of one ``plugin_unet`` / ``plugin_TE`` mapping, validated, in file order."""
    if entries is None:
        return []
    if not isinstance(entries, Mapping):
        raise PluginConfigError(f"{section} must map plugin names to plugin entries, got {type(entries).__name__}.")
    return [parse_entry(section, str(name), spec) for name, spec in entries.items()]


def parse_entry(section: str, name: str, spec: Any) -> PluginEntry:
    label = f"{section}.{name}"
    if not name.isidentifier():
        raise PluginConfigError(f"{label}: a plugin name must be an identifier (it becomes the adapter name).")
    if not isinstance(spec, Mapping):
        raise PluginConfigError(f"{label}: expected a mapping with _target_, _partial_, lr, got {spec!r}.")
    spec = dict(spec)
    config_cls = resolve_target(spec.get("_target_"), label)
    if spec.get("_partial_") is not True:
        raise PluginConfigError(
            f"{label}: '_partial_: True' is required (the plugin is built later, on its host model); "
            f"got {spec.get('_partial_')!r}."
        )
    lr = _learning_rate(spec.get("lr"), label)
    kwargs = _config_kwargs(config_cls, {k: v for k, v in spec.items() if k not in _KEYS}, label)
    try:
        config = config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PluginConfigError(f"{label} ({config_cls.__name__}): {exc}") from exc
    return PluginEntry(section, name, config, lr)


def _learning_rate(value: Any, label: str) -> float:
    if value is None:
        raise PluginConfigError(f"{label}: 'lr' (this plugin's learning rate) is required.")
    try:
        lr = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        lr = math.nan
    if not math.isfinite(lr) or lr < 0:
        raise PluginConfigError(f"{label}: lr must be a non-negative number, got {value!r}.")
    return lr


def _config_kwargs(config_cls: type[HcpConfig], params: dict, label: str) -> dict:
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    base = {f.name for f in dataclasses.fields(HcpConfig)}
    kwargs = {}
    for key, value in params.items():
        field_name = key
        if key == "layers":
            if "target_modules" not in fields:
                selector_fields = sorted(f for f in fields if "layer" in f)
                raise PluginConfigError(
                    f"{label}: {config_cls.__name__} is a cross-layer plugin; give {selector_fields}, not 'layers'."
                )
            field_name = "target_modules"
        elif key in PARAM_ALIASES and key not in fields:
            field_name = PARAM_ALIASES[key]
        if field_name not in fields or field_name in ("peft_type", "peft_hcp_version"):
            own = sorted(fields - base)
            raise PluginConfigError(f"{label}: {config_cls.__name__} has no parameter {key!r}; it takes {own}.")
        kwargs[field_name] = _plain(value)
    return kwargs


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists and dicts (config dataclasses save as JSON)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def attach_plugins(components: Mapping[str, nn.Module], entries: list[PluginEntry]) -> list[dict]:
    """Attach every entry as an adapter (in place) and return one optimizer parameter group per entry.

    Only the plugins' parameters train: the host models are frozen. An entry whose selector matches
    nothing, or whose plugin cannot attach, fails with its name in the message.
    """
    owned: list[list[nn.Parameter]] = []
    for entry in entries:
        module = components[entry.component]
        before = {id(p) for p in module.parameters()}
        try:
            attach(module, entry.config, entry.name)
        except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
            raise PluginConfigError(f"{entry.label} ({type(entry.config).__name__}): {exc}") from exc
        params = [p for p in module.parameters() if id(p) not in before]
        if not params:
            raise PluginConfigError(f"{entry.label}: the plugin attached but has no parameters to train.")
        owned.append(params)
    for module in components.values():
        module.requires_grad_(False)
    groups = []
    for entry, params in zip(entries, owned):
        for param in params:
            param.requires_grad_(True)
        groups.append({"params": params, "lr": entry.lr, "name": entry.label})
    return groups
