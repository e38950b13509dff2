"""Registering peft-hcp tuner types with PEFT.

PEFT keys its tuner tables by members of the closed ``PeftType`` enum, and transformers and diffusers
read ``config.peft_type.value``; a plain string key is not enough. :func:`register_tuner` therefore
adds an enum member first and then calls PEFT's own ``register_peft_method``. Both steps are
idempotent, so importing ``peft_hcp`` twice (or reloading a plugin module) is harmless, while a
*different* class claiming a taken name is an error.

How a saved adapter names its loader: every peft-hcp type is called ``HCP_*`` in
``adapter_config.json`` (``"peft_type": "HCP_LORA"``), and the file also records
``"peft_hcp_version"``. PEFT resolves that type only after ``import peft_hcp`` (PEFT has no plugin
entry points); without the import PEFT raises ``KeyError: 'HCP_LORA'``. Loading never imports a
module named in the file: only types registered in this process can be built.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, TypeVar

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


if TYPE_CHECKING:  # registry sits below base/: the types only, for the checker
    from peft_hcp.base.config import HcpConfig
    from peft_hcp.base.tuner import HcpTuner


TYPE_PREFIX = "hcp_"
ConfigT = TypeVar("ConfigT", bound=type)


def peft_type_for(name: str) -> PeftType:
    """Return the ``PeftType`` member for ``name``, adding it to the enum if it is new."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    setattr(member, "__objclass__", PeftType)  # noqa: B010 - what Enum sets on its own members
    type.__setattr__(PeftType, key, member)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member


def register_tuner(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a peft-hcp tuner type under ``name`` (lower case, starting with ``hcp_``).

    The adapter prefix is ``name + "_"``; ``model_cls.prefix`` must equal it.
    """
    if not name.startswith(TYPE_PREFIX) or not name.isidentifier() or not name.islower():
        raise ValueError(
            f"A peft-hcp type name must be a lower-case identifier starting with {TYPE_PREFIX!r}: {name!r}"
        )
    peft_type = peft_type_for(name)
    known = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if known is not None:
        if _same_class(known, config_cls) and _same_class(PEFT_TYPE_TO_TUNER_MAPPING[peft_type], model_cls):
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls  # a reloaded module: its classes win
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
            return peft_type
        raise KeyError(f"The PEFT type {name!r} is already registered to {known.__module__}.{known.__qualname__}.")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=name + "_")
    return peft_type


def registered_types() -> dict[str, type]:
    """Every registered peft-hcp type, ``{type name: config class}``, in registration order (the bundled
    types on ``import peft_hcp``, then user plugins as their modules are imported)."""
    prefix = TYPE_PREFIX.upper()
    return {
        peft_type.value.lower(): config_cls
        for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if peft_type.value.startswith(prefix)
    }


def _same_class(a: type, b: type) -> bool:
    """True for the same class, or the same class defined again by a module reload."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def bind_type(model_cls: type[HcpTuner], config_cls: type[HcpConfig]) -> None:
    """Bind ``config_cls`` to the tuner ``model_cls`` and register the PEFT type named after its layer class.

    A tuner class statement calls this through its ``config_cls`` keyword::

        class HcpLoraLayer(SinglePluginLayer, type_name="hcp_lora", block_cls=LoraBlock): ...
        class HcpLoraModel(HcpSingleModel, layer_cls=HcpLoraLayer, config_cls=HcpLoraConfig): ...
    """
    layer_cls = model_cls.tuner_layer_cls
    if not issubclass(config_cls, layer_cls.config_base):
        raise TypeError(f"{config_cls.__name__} must subclass {layer_cls.config_base.__name__}.")
    config_cls.type_name = layer_cls.type_name
    config_cls.plugin_cls = inspect.getattr_static(layer_cls, "block_cls")  # a LazyClass stays lazy
    register_tuner(layer_cls.type_name, config_cls, model_cls)


class LazyClass:
    """A class attribute naming a class that is imported on first access: ``LazyClass("pkg.module", "Name")``.

    A layer class may name its block so (``block_cls=LazyClass(...)``): its type registers with PEFT at once,
    and the block's module (the ControlNets' model code) is imported when an adapter is first attached.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __get__(self, obj: object, owner: Optional[type] = None) -> type:
        return getattr(importlib.import_module(self.module), self.name)


def generated_type(type_name: str, block_cls: type, layer_base: type, model_base: type) -> Callable[[ConfigT], ConfigT]:
    """The ``register_*_plugin`` decorator of a user plugin: its layer and tuner classes are generated.

    This keeps a user plugin's registration at one decorator line (``@register_single_plugin(name,
    Block)``); the bundled types write these classes in source. The generated classes are named after the
    block (``GainBlockLayer``, ``GainBlockModel``) and placed in the block's module, so tracebacks name
    them and pickle (multiprocessing) finds them.
    """

    def decorate(config_cls: ConfigT) -> ConfigT:
        layer_cls = _made_class(block_cls, "Layer", layer_base, type_name=type_name, block_cls=block_cls)
        _made_class(block_cls, "Model", model_base, layer_cls=layer_cls, config_cls=config_cls)
        return config_cls

    return decorate


def _made_class(owner: type, suffix: str, base: type, **class_kwargs) -> type:
    """A subclass of ``base`` named after ``owner`` and placed in ``owner``'s module."""
    namespace = {"__module__": owner.__module__, "__qualname__": owner.__qualname__ + suffix}
    made = type(owner.__name__ + suffix, (base,), namespace, **class_kwargs)
    setattr(sys.modules[owner.__module__], made.__name__, made)
    return made
