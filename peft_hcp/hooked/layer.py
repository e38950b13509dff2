"""The container of the cross-layer plugins: a PEFT tuner layer that owns blocks and hooks, wraps nothing.

One container per plugin type sits on the root of the adapted model (attribute named after the type, e.g.
``hcp_skip``), so ``state_dict``, ``.to()`` and ``deepcopy`` see the blocks, and PEFT's structural code
(``disable_adapter``, ``set_adapter``, ``delete_adapter``, trainable-parameter marking, state-dict
selection) treats it like any tuner layer. Its blocks sit in the ``ModuleDict`` ``<type>_blocks``, keyed
by adapter name.

Hooks are ``functools.partial`` objects over bound methods of the container and are registered with
``with_kwargs=True``; ``copy.deepcopy`` of the model therefore rebinds every hook to the copy's container.
The container remembers which module holds which hook id, so deleting an adapter removes exactly its
hooks. A selected layer that is itself a PEFT tuner layer (a LoRA wrapper) is hooked on its base layer, so
unloading that other adapter keeps these hooks in place.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Optional, cast

from torch import nn

from peft_hcp.base.blocks import BlockLayer
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import MergeNotSupportedError, SelectorMatchError
from peft_hcp.hooked.block import MultiPluginBlock, PluginBlock, _HookedBlock
from peft_hcp.hooked.config import HcpMultiPluginConfig, HcpPluginConfig
from peft_hcp.selectors import (
    Target,
    parse_selectors,
    resolve,
    resolve_each,
    selectable_modules,
)


HookSpec = tuple[Target, str, int]  # (layer, "from" | "to", index)


class HookedPluginLayer(BlockLayer):
    """Holds one plugin type's blocks for every adapter and the hooks that drive them."""

    block_base: ClassVar[type] = _HookedBlock
    block_cls: ClassVar[type[_HookedBlock]]
    snapshot_attrs: ClassVar[tuple[str, ...]] = ("_hooks",)
    # a tuner layer that wraps nothing must not resolve `weight` / `bias` through BaseTunerLayer (itself)
    weight = None  # type: ignore[assignment]
    bias = None  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self._hooks: dict[str, list[tuple[nn.Module, bool, int]]] = {}

    # -- adding and removing adapters ----------------------------------------------------------

    def update_layer(self, adapter_name: str, config: Any, root: nn.Module) -> None:
        """Build ``adapter_name``'s blocks for ``root`` and hook them into its layers."""
        if adapter_name in self.blocks:
            raise ValueError(f"Adapter {adapter_name!r} already exists on {type(self).__name__}.")
        modules = [(n, m) for n, m in selectable_modules(root) if not isinstance(m, HookedPluginLayer)]
        blocks, specs = self.build(root, config, modules)
        for block in blocks.modules():
            if isinstance(block, _HookedBlock):
                block.adapter_name = adapter_name
        device = next((p.device for p in root.parameters()), None)
        self.blocks[adapter_name] = blocks.to(device) if device is not None else blocks
        handles = []
        for target, role, idx in specs:
            host = base_module(target.module)
            if target.prehook:
                handle = host.register_forward_pre_hook(
                    partial(self._pre_hook, adapter_name, role, idx), with_kwargs=True
                )
            else:
                handle = host.register_forward_hook(partial(self._post_hook, adapter_name, role, idx), with_kwargs=True)
            handles.append((host, target.prehook, handle.id))
        self._hooks[adapter_name] = handles
        self.set_adapter(self.active_adapters or [adapter_name])

    def build(self, root: nn.Module, config: Any, modules: list) -> tuple[nn.Module, list[HookSpec]]:
        """The adapter's blocks (one module) and the hooks to register: implemented per kind."""
        raise NotImplementedError

    def remove_hooks(self, adapter_name: Optional[str] = None) -> None:
        """Remove the hooks of ``adapter_name`` (all adapters when ``None``) from the host layers."""
        names = list(self._hooks) if adapter_name is None else [adapter_name]
        for name in names:
            for host, prehook, hook_id in self._hooks.pop(name, []):
                hooks = host._forward_pre_hooks if prehook else host._forward_hooks
                with_kwargs = host._forward_pre_hooks_with_kwargs if prehook else host._forward_hooks_with_kwargs
                hooks.pop(hook_id, None)
                with_kwargs.pop(hook_id, None)
                host._forward_hooks_always_called.pop(hook_id, None)
            if name in self.blocks:
                for block in self.blocks[name].modules():
                    if isinstance(block, _HookedBlock):
                        block.cache.clear()

    def remove_from(self, model: nn.Module, name: str) -> None:
        """Remove every hook of this container from the host layers, then the container itself."""
        self.remove_hooks()
        parent, _, attr = name.rpartition(".")
        delattr(model.get_submodule(parent), attr)

    def delete_adapter(self, adapter_name: str) -> None:
        self.remove_hooks(adapter_name)
        super().delete_adapter(adapter_name)

    # -- running -------------------------------------------------------------------------------

    def _is_on(self, adapter_name: str) -> bool:
        return not self._disable_adapters and adapter_name in self.active_adapters and adapter_name in self.blocks

    def _pre_hook(self, adapter_name: str, role: str, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        if not self._is_on(adapter_name):
            return None
        return self.dispatch(adapter_name, role, idx, args, kwargs, None)

    def _post_hook(
        self, adapter_name: str, role: str, idx: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ):
        if not self._is_on(adapter_name):
            return None
        return self.dispatch(adapter_name, role, idx, args, kwargs, output)

    def dispatch(self, adapter_name: str, role: str, idx: int, args: tuple, kwargs: dict, output: Any) -> Any:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} is a container driven by hooks; it is never called itself.")

    # -- PEFT's layer interface ----------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise MergeNotSupportedError(
            f"{self.block_cls.__name__} cannot be merged: it is a cross-layer plugin whose effect is computed from "
            "the activations of other layers at run time, so there is no weight change to fold into a host. "
            "Keep it attached, or unload() it."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def _blocks_of(self, adapter_name: str) -> list[_HookedBlock]:
        if adapter_name not in self.blocks:
            return []
        return [m for m in self.blocks[adapter_name].modules() if isinstance(m, _HookedBlock)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adapters={list(self.blocks)}, hooks={sum(map(len, self._hooks.values()))})"


def _in_list_order(root: nn.Module, selectors: list[str], modules: list) -> list[Target]:
    """The targets in the order of the selector list, a regex contributing its matches in model order."""
    return [target for targets in resolve_each(root, parse_selectors(selectors), modules=modules) for target in targets]


class PluginLayer(HookedPluginLayer):
    """Container of a from -> to plugin type: per adapter a ``ModuleList`` with one block per pair."""

    block_base: ClassVar[type] = PluginBlock
    config_base: ClassVar[type] = HcpPluginConfig
    block_cls: ClassVar[type[PluginBlock]]

    def build(self, root: nn.Module, config: Any, modules: list) -> tuple[nn.Module, list[HookSpec]]:
        for field_name in ("from_layer", "to_layer"):
            if not getattr(config, field_name):
                raise ValueError(f"{type(config).__name__} needs `{field_name}`: a list of layer selectors.")
        sources = resolve(root, parse_selectors(config.from_layer), modules=modules)
        sinks = resolve(root, parse_selectors(config.to_layer), modules=modules)
        if len(sources) != len(sinks):
            raise SelectorMatchError(
                f"from_layer {config.from_layer} matched {len(sources)} layer(s) and to_layer {config.to_layer} "
                f"matched {len(sinks)}; they pair up in model order and must match equally many layers.\n"
                f"  from: {[t.name for t in sources]}\n  to:   {[t.name for t in sinks]}"
            )
        if self.block_cls.from_output and any(t.prehook for t in sources):
            raise ValueError(
                f"{self.block_cls.__name__} reads its from-layer's output (from_output = True); a 'prehook:' "
                "from-layer has no output yet."
            )
        blocks = nn.ModuleList(self.block_cls(src, dst, config) for src, dst in zip(sources, sinks))
        specs = [
            spec for i, (src, dst) in enumerate(zip(sources, sinks)) for spec in ((src, "from", i), (dst, "to", i))
        ]
        return blocks, specs

    def dispatch(self, adapter_name: str, role: str, idx: int, args: tuple, kwargs: dict, output: Any) -> Any:
        block = cast(PluginBlock, cast(nn.ModuleList, self.blocks[adapter_name])[idx])
        if role == "from":
            block.from_layer_hook(args, kwargs, output)
            return None
        return block.to_layer_hook(args, kwargs, output)


class MultiPluginLayer(HookedPluginLayer):
    """Container of a many -> many plugin type: per adapter one block instance."""

    block_base: ClassVar[type] = MultiPluginBlock
    config_base: ClassVar[type] = HcpMultiPluginConfig
    block_cls: ClassVar[type[MultiPluginBlock]]

    def build(self, root: nn.Module, config: Any, modules: list) -> tuple[nn.Module, list[HookSpec]]:
        from_sel, to_sel = config.from_layers, config.to_layers
        if from_sel is None or to_sel is None:
            default_from, default_to = self.block_cls.default_layers(root)
            from_sel = default_from if from_sel is None else from_sel
            to_sel = default_to if to_sel is None else to_sel
        sources = _in_list_order(root, from_sel, modules)
        sinks = _in_list_order(root, to_sel, modules)
        block = self.block_cls(sources, sinks, root, config)
        specs = [(t, "from", i) for i, t in enumerate(sources)] + [(t, "to", i) for i, t in enumerate(sinks)]
        return block, specs

    def dispatch(self, adapter_name: str, role: str, idx: int, args: tuple, kwargs: dict, output: Any) -> Any:
        block = cast(MultiPluginBlock, self.blocks[adapter_name])
        if role == "from":
            block.from_layer_hook(idx, args, kwargs, output)
            return None
        return block.to_layer_hook(idx, args, kwargs, output)
