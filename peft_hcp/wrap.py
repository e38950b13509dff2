"""``wrap_model`` semantics shared by the single-layer and patch kinds.

A plugin class declares ``wrapable_classes``; a selector that picks a container (``''`` is the whole
model) attaches the plugin to every module of those classes inside it. Two config fields narrow that,
as HCP-Diffusion's ``wrap_model(..., exclude_key=, exclude_classes=)`` does:

``exclude_key``
    A regular expression searched (``re.search``) in every module's dotted name; a module that matches
    is skipped **with everything inside it**.
``exclude_classes``
    Class names; a module that is an instance of one of them is skipped with everything inside it. A
    name is a class's ``__name__`` (``"Attention"``) or its ``module.qualname``
    (``"diffusers.models.attention_processor.Attention"``); base classes count (``isinstance``). Classes
    may be passed too; the config stores their qualified names, so it saves as JSON.

A plugin never wraps its own submodules (or any other adapter's): the selector resolution hides the
children of PEFT tuner layers and modules marked ``_hcp_internal``.

:func:`wrap_model` is the functional entry point: attach a config's plugin in place and get the
``{module name: plugin block}`` dict HCP-Diffusion's ``wrap_model`` returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

from peft import inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn


ClassSpec = Union[str, type]


def class_name(cls: type) -> str:
    """The qualified name ``exclude_classes`` stores for ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def normalize_exclude_classes(value: Optional[Union[ClassSpec, Sequence[ClassSpec]]]) -> Optional[list[str]]:
    """``exclude_classes`` as a JSON-safe list of names (classes become qualified names)."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else list(value)
    names = []
    for item in items:
        if isinstance(item, type):
            names.append(class_name(item))
        elif isinstance(item, str) and item:
            names.append(item)
        else:
            raise ValueError(f"exclude_classes takes classes or class names, got {item!r}.")
    return names


def check_exclude_key(value: Optional[str]) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(f"exclude_key must be a non-empty regular expression string, got {value!r}.")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"exclude_key {value!r} is not a valid regular expression: {exc}") from exc


def _is_excluded_class(module: nn.Module, names: set[str]) -> bool:
    return any(cls.__name__ in names or class_name(cls) in names for cls in type(module).__mro__)


def excluded_subtrees(
    modules: Iterable[tuple[str, nn.Module]], exclude_key: Optional[str], exclude_classes: Optional[Sequence[str]]
) -> set[str]:
    """Names of ``modules`` (in ``named_modules()`` order) that ``exclude_key``/``exclude_classes`` remove."""
    if exclude_key is None and not exclude_classes:
        return set()
    pattern = re.compile(exclude_key) if exclude_key is not None else None
    names = set(exclude_classes or ())
    excluded: set[str] = set()
    roots: list[str] = []  # excluded subtree roots on the current depth-first path
    for name, module in modules:
        while roots and not _is_inside(name, roots[-1]):
            roots.pop()
        if roots:
            excluded.add(name)
        elif (pattern is not None and pattern.search(name)) or _is_excluded_class(module, names):
            excluded.add(name)
            roots.append(name)
    return excluded


def _is_inside(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def wrap_model(model: nn.Module, config, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Attach ``config``'s plugin to ``model`` in place; return ``{module name: plugin block}``.

    This is PEFT's ``inject_adapter_in_model`` (the route diffusers' ``add_adapter`` takes), so the
    adapter is managed, saved and removed with PEFT's and diffusers' tools like any other.
    """
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    layer_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].tuner_layer_cls
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, layer_cls) and adapter_name in module.blocks:
            host_name = name
            while host_name.endswith(".base_layer"):  # a layer of this type inside another tuner layer
                host_name = host_name[: -len(".base_layer")]
            blocks[host_name] = module.blocks[adapter_name]
    return blocks
