"""``HcpSingleModel``: the PEFT tuner (``BaseTuner``) of single-layer plugins, and ``register_single_plugin``.

Target selection is peft-hcp's own: the selectors are resolved once per adapter against the model
(:func:`find_hosts`) and PEFT's ``target_modules`` machinery only asks whether a name is among the
hosts. PEFT rewrites ``target_modules`` in place when a list has 20 or more entries, which mangles
regular expressions; the rewrite lands on a working copy of the config, never on the saved one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional, cast

from peft import PeftConfig
from torch import nn

from peft_hcp.base.blocks import HostedBlock
from peft_hcp.base.host_layer import HostLayer
from peft_hcp.base.tuner import HcpTuner
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import UnsupportedLayerError
from peft_hcp.registry import ConfigT, generated_type
from peft_hcp.selectors import (
    parse_selectors,
    resolve,
    resolve_each,
    selectable_modules,
)
from peft_hcp.single.block import SinglePluginBlock
from peft_hcp.single.config import HcpSingleConfig
from peft_hcp.single.layer import SinglePluginLayer
from peft_hcp.wrap import excluded_subtrees


def find_hosts(model: nn.Module, config: HcpSingleConfig, block_cls: type[HostedBlock]) -> list[str]:
    """Names of the layers a single plugin attaches to, in model order.

    A selected layer of one of ``block_cls.wrapable_classes`` is a host; a selected container
    contributes every such layer inside it. Layers matched by ``exclude_modules`` are dropped, and so
    are the subtrees ``exclude_key`` / ``exclude_classes`` pick (see :mod:`peft_hcp.wrap`).
    """
    if config.target_modules is None:
        raise ValueError("Please specify `target_modules` in `peft_config` (use [''] for every wrapable layer).")
    modules = selectable_modules(model)
    selectors = parse_selectors(config.target_modules)
    excluded = {t.name for t in _resolve_optional(model, parse_selectors(config.exclude_modules), modules)}
    excluded |= excluded_subtrees(modules, config.exclude_key, config.exclude_classes)
    chosen_by: dict[str, list[int]] = {}  # picked module name -> indices of the selectors that picked it
    for index, targets in enumerate(resolve_each(model, selectors, modules=modules)):
        for target in targets:
            chosen_by.setdefault(target.name, []).append(index)
    hosts: list[str] = []
    fruitful: set[int] = set()  # selectors that gave at least one host
    for name, module in modules:  # one pass; each host looks up its few ancestors
        if name in excluded or not _is_wrapable(module, block_cls):
            continue
        pickers = [i for ancestor in _self_and_ancestors(name) for i in chosen_by.get(ancestor, ())]
        if pickers:
            hosts.append(name)
            fruitful.update(pickers)
    for index, selector in enumerate(selectors):
        if index not in fruitful:
            picked = {name for name, i in chosen_by.items() if index in i}
            kinds = sorted({type(m).__name__ for n, m in modules if n in picked})
            raise UnsupportedLayerError(
                f"Selector {selector.text!r} picked only layers of type {kinds} with no "
                f"{'/'.join(c.__name__ for c in block_cls.wrapable_classes)} inside (after exclusions): "
                f"{block_cls.__name__} cannot attach there."
            )
    return hosts


def _resolve_optional(model, selectors, modules):
    """Like :func:`resolve`, but a selector that matches nothing is fine (PEFT's exclude semantics)."""
    return [t for s in selectors for t in _try_resolve(model, s, modules)]


def _try_resolve(model, selector, modules):
    try:
        return resolve(model, [selector], modules=modules)
    except ValueError:
        return []


def _is_wrapable(module: nn.Module, block_cls: type[HostedBlock]) -> bool:
    return isinstance(base_module(module), block_cls.wrapable_classes)


def _self_and_ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a", ""]`` (``''`` is the root, which holds everything)."""
    names = [name]
    while name:
        name = name.rpartition(".")[0]
        names.append(name)
    return names


class HcpSingleModel(HcpTuner):
    """Attaches one single-layer plugin type: ``class LoraModel(HcpSingleModel, layer_cls=LoraLayer)``."""

    tuner_layer_cls: type[HostLayer]

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return copy.copy(peft_config)  # PEFT may rewrite target_modules on what we return: keep the user's intact

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        hosts = find_hosts(model, cast(HcpSingleConfig, peft_config), self.tuner_layer_cls.block_cls)
        self._hosts = set(hosts)
        cast(HcpSingleConfig, peft_config).target_modules = hosts  # the working copy: what PEFT's bookkeeping sees

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:  # type: ignore[override]
        return key in self._hosts

    def _add_adapter_to(
        self, target: nn.Module, target_name: str, parent: nn.Module, config, adapter_name: str
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        self._replace_module(parent, target_name, self.tuner_layer_cls(target, adapter_name, config), target)

    def _merge_layers(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Merge every layer, or (``safe_merge``) none when one of them would get a non-finite weight."""
        self._check_merge_allowed()
        layers = [cast(SinglePluginLayer, layer) for _, layer in self._own_layers()]  # patches refused above
        for layer in layers:  # a host that cannot take a merge refuses before any layer changes
            layer.check_mergeable(adapter_names)
        if safe_merge:
            for layer in layers:
                layer.check_merge(adapter_names)
        for layer in layers:
            layer.merge(adapter_names=adapter_names)


def register_single_plugin(type_name: str, block_cls: type[SinglePluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator that makes ``config_cls`` + ``block_cls`` the PEFT type ``type_name``.

    Example::

        @register_single_plugin("hcp_scale", ScaleBlock)
        @dataclass
        class HcpScaleConfig(HcpSingleConfig):
            init_gain: float = 0.0

    After that, ``get_peft_model(model, HcpScaleConfig(target_modules=[...]))`` works and the adapter
    saves and loads with PEFT's tooling (in a fresh process, once the defining module is imported). The
    type's layer and tuner classes are generated (see :func:`peft_hcp.registry.generated_type`).
    """
    return generated_type(type_name, block_cls, SinglePluginLayer, HcpSingleModel)
