"""``ModelSnapshot``: what attaching an adapter may change on a model, taken before and put back on refusal.

Attaching changes three things: the module tree (wrappers replace hosts, containers and PEFT's
``modules_to_save`` copies are added), the ``requires_grad`` flags (the base model is frozen) and the forward
hooks of host layers (the cross-layer kinds). Parameter values are never changed by an attach. Restoring the
child dicts of every module of the original tree, the flags and the hook tables gives the model back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


#: the hook tables of an ``nn.Module``
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


@dataclass
class ModelSnapshot:
    children: list[tuple[nn.Module, dict[str, nn.Module]]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    hook_ids: list[tuple[nn.Module, dict[str, set[int]]]]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        modules = list(model.modules())
        return cls(
            children=[(m, dict(m._modules)) for m in modules],
            requires_grad=[(p, p.requires_grad) for p in model.parameters()],
            hook_ids=[(m, {table: set(getattr(m, table)) for table in HOOK_TABLES}) for m in modules],
        )

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, ids in self.hook_ids:
            for table, kept in ids.items():
                hooks = getattr(module, table)
                for hook_id in set(hooks) - kept:
                    del hooks[hook_id]
