"""``HcpHookedModel``: the PEFT tuner (``BaseTuner``) of the cross-layer kinds, and their ``register_*`` decorators.

PEFT's injection loop visits modules by name and replaces targets; these kinds replace nothing. The
tuner therefore puts its container on the model root in ``_prepare_model`` and makes the container
itself the only "target": ``_create_and_replace`` asks it to build the adapter's blocks and hooks. The
from/to selectors are resolved by the container (PEFT's ``target_modules`` never sees them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Optional, cast

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.base.tuner import HcpTuner
from peft_hcp.hooked.block import MultiPluginBlock, PluginBlock
from peft_hcp.hooked.layer import HookedPluginLayer, MultiPluginLayer, PluginLayer
from peft_hcp.registry import ConfigT, generated_type


class HcpHookedModel(HcpTuner):
    """Attaches one cross-layer plugin type: ``class HcpSkipModel(HcpHookedModel, layer_cls=HcpSkipContainer)``."""

    tuner_layer_cls: type[HookedPluginLayer]

    @classmethod
    def container_name(cls) -> str:
        """Attribute of the model root that holds the container: the type name (the prefix without ``_``).

        It must not contain the prefix itself: PEFT's ``delete_adapter`` skips modules whose name does.
        """
        return cls.prefix[:-1]

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        working = copy.copy(peft_config)  # never touch the user's (saved) config
        working.target_modules = [self.container_name()]
        return working

    def _check_host(self, model: nn.Module, config: Any) -> None:
        self.tuner_layer_cls.block_cls.check_host(model, config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._first_tuner_layer = False
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self._first_tuner_layer:
            # PEFT keeps the trainability of existing parameters once a tuner layer exists, and our
            # container exists before its loop runs: freeze the base model as a first injection should.
            self._mark_only_adapters_as_trainable(model)

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        name = self.container_name()
        existing = getattr(model, name, None)
        if existing is None:
            self._first_tuner_layer = not any(isinstance(m, BaseTunerLayer) for m in model.modules())
            model.add_module(name, self.tuner_layer_cls())
        elif not isinstance(existing, self.tuner_layer_cls):
            raise ValueError(f"{type(model).__name__} already has an attribute {name!r}; cannot attach {name} plugins.")

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:  # type: ignore[override]
        return key == self.container_name()

    def _add_adapter_to(
        self, target: nn.Module, target_name: str, parent: nn.Module, config, adapter_name: str
    ) -> None:
        cast(HookedPluginLayer, target).update_layer(
            adapter_name, config, parent
        )  # the target is the container; its parent the root

    def _merge_layers(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        getattr(self.model, self.container_name()).merge(safe_merge, adapter_names)  # refuses, saying why


def register_plugin(type_name: str, block_cls: type[PluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator: make ``config_cls`` (an ``HcpPluginConfig``) + ``block_cls`` the PEFT type ``type_name``.

    Example::

        @register_plugin("hcp_gate", GateBlock)
        @dataclass
        class HcpGateConfig(HcpPluginConfig):
            pass
    """
    return generated_type(type_name, block_cls, PluginLayer, HcpHookedModel)


def register_multi_plugin(type_name: str, block_cls: type[MultiPluginBlock]) -> Callable[[ConfigT], ConfigT]:
    """Class decorator: make ``config_cls`` (an ``HcpMultiPluginConfig``) + ``block_cls`` the PEFT type ``type_name``."""
    return generated_type(type_name, block_cls, MultiPluginLayer, HcpHookedModel)
