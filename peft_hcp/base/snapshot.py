"""All or nothing: every route that changes a model (attach, load, import, merge) runs inside
``with all_or_nothing(model):``, and when it raises, the model is put back exactly as it was.

What an adapter route may change, and so what :class:`ModelSnapshot` takes and puts back, for every module
of the tree as it was when the route started:

* the module tree: each module's children, parameters and buffers (wrappers that replaced hosts, plugin
  containers and PEFT's ``modules_to_save`` copies go again);
* ``requires_grad`` of every parameter (an attach freezes the base model) and each module's train/eval mode;
* forward hooks and pre-hooks (the cross-layer kinds hook host layers);
* the adapter bookkeeping PEFT and diffusers keep in plain attributes (:data:`BOOKKEEPING`: adapter configs,
  diffusers' "adapters loaded" flag, active, merged and targeted adapters), and the attributes a module's class
  names in ``snapshot_attrs``;
* with ``values=``, the values of the tensors a route writes into (a weight load into an existing adapter, a
  merge). Values are not taken otherwise: an attach writes no existing tensor, and a copy of every weight of a
  large model would double its memory.

Mutable attributes (dicts, lists, sets) are refilled in place, so objects shared by reference (the tuner's and
the model's ``peft_config``) stay shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


#: the hook tables of an ``nn.Module``
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
#: PEFT's and diffusers' adapter bookkeeping, in whichever module holds it: the configs (model root, tuner),
#: diffusers' flag that a model carries adapters, the tuner's targeted names and active adapter, PeftModel's
#: ``modules_to_save``, each tuner layer's active, merged and disabled adapters
BOOKKEEPING = (
    "peft_config",
    "_hf_peft_config_loaded",
    "targeted_module_names",
    "targeted_parameter_names",
    "active_adapter",
    "modules_to_save",
    "_active_adapter",
    "merged_adapters",
    "_disable_adapters",
)
#: what every module has: its tree, its hooks and its mode
_MODULE_STATE = ("_modules", "_parameters", "_buffers", *HOOK_TABLES, "training")


def _watched(module: nn.Module) -> tuple[str, ...]:
    return _MODULE_STATE + BOOKKEEPING + getattr(type(module), "snapshot_attrs", ())


def _contents(value: Any) -> Any:
    """A shallow copy of a mutable container (to refill it later), ``None`` for anything else."""
    return type(value)(value) if isinstance(value, (dict, list, set)) else None


def _refill(value: Any, contents: Any) -> None:
    if isinstance(value, list):
        value[:] = contents
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(contents)


@dataclass
class ModelSnapshot:
    """The state of some modules that a route may change; :meth:`restore` puts it back (see the module docstring)."""

    #: per module, each watched attribute it had: ``(object, contents)``; one it lacked is absent
    attrs: dict[nn.Module, dict[str, tuple[Any, Any]]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    values: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def take(cls, *roots: nn.Module, values: Iterable[torch.Tensor] = ()) -> ModelSnapshot:
        modules = dict.fromkeys(m for root in roots for m in root.modules())
        return cls(
            attrs={
                m: {name: (m.__dict__[name], _contents(m.__dict__[name])) for name in _watched(m) if name in m.__dict__}
                for m in modules
            },
            requires_grad=[
                (p, p.requires_grad)
                for p in dict.fromkeys(p for m in modules for p in m._parameters.values())
                if p is not None
            ],
            values=[(t, t.detach().clone()) for t in values],
        )

    def forget_adapter(self, adapter_name: str, *modules: nn.Module) -> None:
        """Restore ``modules`` as if ``adapter_name`` had never been announced to them.

        PEFT records a new adapter's config (in the tuner's and the model's ``peft_config``), and diffusers marks
        the model as carrying adapters (``_hf_peft_config_loaded``), before the injection starts. A module left
        with no config loses both attributes.
        """
        for module in modules:
            saved = self.attrs[module]
            configs = saved.get("peft_config")
            if configs is not None and isinstance(configs[1], dict):
                configs[1].pop(adapter_name, None)
                if configs[1]:
                    continue
            saved.pop("peft_config", None)
            saved.pop("_hf_peft_config_loaded", None)

    def restore(self) -> None:
        for module, saved in self.attrs.items():
            for name in _watched(module):
                if name in saved:
                    value, contents = saved[name]
                    _refill(value, contents)
                    module.__dict__[name] = value
                else:
                    module.__dict__.pop(name, None)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)


@contextmanager
def all_or_nothing(*roots: nn.Module, values: Iterable[torch.Tensor] = ()) -> Iterator[ModelSnapshot]:
    """Run the ``with`` block; if it raises, put ``roots`` back as they were (``values``: and those tensors' values).

    Yields the snapshot, which the block may amend (:meth:`ModelSnapshot.forget_adapter`).
    """
    snapshot = ModelSnapshot.take(*roots, values=values)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
