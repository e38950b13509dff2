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
its parameters form one optimizer group with the entry's ``lr`` and, if given, its ``weight_decay``.
``train: false`` attaches the plugin frozen (its group trains nothing; ``lr`` may then be left out).

HCP's meanings are kept: selectors may start at HCP's roots, ``denoiser.`` (``plugin_unet``) and ``TE.``
(``plugin_TE``) — ``denoiser.conv_in`` is that exact layer, ``re:denoiser\\..*attn1`` a pattern — and a
LoHa's ``rank`` is the total rank, split over its ``rank_groups`` pairs with the scale ``alpha / rank``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from peft_hcp.adapter_set import attach
from peft_hcp.base.config import HcpConfig
from peft_hcp.base.snapshot import all_or_nothing
from peft_hcp.errors import PeftHcpError


#: Config sections and the pipeline component each one adapts.
SECTIONS = {"plugin_unet": "unet", "plugin_TE": "text_encoder"}
#: HCP-Diffusion class names whose peft-hcp classes are named differently.
HCP_ALIASES = {"Skip": "hcp_skip", "LohaLayer": "hcp_loha", "LoraLayer": "hcp_lora"}
#: HCP-Diffusion parameter names -> peft-hcp config field names.
PARAM_ALIASES = {"rank": "r"}
#: HCP's name of each section's model, which its selectors may start with.
SECTION_ROOTS = {"plugin_unet": "denoiser", "plugin_TE": "TE"}
_SELECTOR_FIELDS = ("layers", "target_modules", "from_layer", "to_layer", "from_layers", "to_layers")
_KEYS = ("_target_", "_partial_", "lr", "train", "weight_decay")
_FLAGS = re.compile(r"^((?:(?:re|prehook|pre_hook):)*)(.*)$", re.S)


class PluginConfigError(PeftHcpError, ValueError):
    """A ``plugin_unet`` / ``plugin_TE`` entry that cannot be turned into an adapter."""


@dataclass
class PluginEntry:
    """One configured plugin: where it goes, its PEFT config and its learning rate."""

    section: str
    name: str
    config: PeftConfig  # an HcpConfig from a file; any PEFT config when built in code
    lr: float
    train: bool = True
    weight_decay: Optional[float] = None

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
    trains = spec.get("train", True)
    if not isinstance(trains, bool):
        raise PluginConfigError(f"{label}: train must be true or false, got {trains!r}.")
    lr = _learning_rate(spec.get("lr", None if trains else 0.0), label)
    decay = None if spec.get("weight_decay") is None else _number(spec["weight_decay"], "weight_decay", label)
    params = {k: v for k, v in spec.items() if k not in _KEYS}
    root = SECTION_ROOTS.get(section)
    for key in _SELECTOR_FIELDS:
        if root and key in params:
            params[key] = _from_root(_plain(params[key]), root)
    kwargs = _config_kwargs(config_cls, params, label)
    try:
        config = config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PluginConfigError(f"{label} ({config_cls.__name__}): {exc}") from exc
    return PluginEntry(section, name, config, lr, trains, decay)


def _from_root(selectors: Any, root: str) -> Any:
    """Selectors written from HCP's model root (``denoiser.x``, ``re:denoiser\\..*``) as selectors of the component.

    An HCP name is exact, so ``denoiser.x`` becomes ``re:x`` (a plain ``x`` also picks every ``*.x``).
    """
    if isinstance(selectors, (list, tuple)):
        return [_from_root(item, root) for item in selectors]
    if not isinstance(selectors, str):
        return selectors
    flags, body = _FLAGS.match(selectors).groups()
    if "re:" in flags:
        for start in (re.escape(root) + r"\.", root + "."):
            if body.startswith(start):
                return flags + body[len(start) :]
        return flags.replace("re:", "") if body == root else selectors
    if body == root:
        return flags
    if body.startswith(root + "."):
        return f"{flags}re:{re.escape(body[len(root) + 1 :])}"
    return selectors


def _learning_rate(value: Any, label: str) -> float:
    if value is None:
        raise PluginConfigError(f"{label}: 'lr' (this plugin's learning rate) is required.")
    return _number(value, "lr", label)


def _number(value: Any, key: str, label: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise PluginConfigError(f"{label}: {key} must be a non-negative number, got {value!r}.")
    return number


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
    if "rank" in params and "rank_groups" in fields:
        _split_rank(kwargs, label)
    return kwargs


def _split_rank(kwargs: dict, label: str) -> None:
    """HCP's LoHa ``rank`` is the total over its ``rank_groups`` pairs, scaled by ``alpha / rank``: give each
    pair ``rank // rank_groups`` (as HCP does) and keep HCP's scale."""
    groups = kwargs.get("rank_groups", 2)
    rank = kwargs["r"]
    if isinstance(rank, (float, bool)) or not isinstance(rank, int) or not isinstance(groups, int):
        raise PluginConfigError(f"{label}: with rank_groups, give HCP's rank as an int total (got rank={rank!r}).")
    if rank < groups:
        raise PluginConfigError(f"{label}: rank {rank} is split over {groups} rank_groups; give at least {groups}.")
    kwargs["r"] = rank // groups
    if kwargs.get("alpha_auto_scale", True):
        kwargs["alpha"] = kwargs.get("alpha", 1.0) * kwargs["r"] / rank


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists and dicts (config dataclasses save as JSON)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def attach_plugins(components: Mapping[str, nn.Module], entries: list[PluginEntry]) -> list[dict]:
    """Attach every entry as an adapter (in place) and return one optimizer parameter group per entry.

    Only the plugins' parameters train (not those of ``train: false`` entries): the host models are
    frozen. An entry whose selector matches nothing, or whose plugin cannot attach, fails with its name
    in the message.
    """
    owned: list[list[nn.Parameter]] = []
    with all_or_nothing(*components.values()):  # a refused entry takes the ones before it back
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
            param.requires_grad_(entry.train)
        group = {"params": params, "lr": entry.lr, "name": entry.label}
        if entry.weight_decay is not None:
            group["weight_decay"] = entry.weight_decay
        groups.append(group)
    return groups
