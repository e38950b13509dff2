"""``HcpHookedModel``: the PEFT tuner (``BaseTuner``) of the cross-layer plugin kinds.

PEFT's injection loop visits modules by name and replaces targets; these kinds replace nothing. The
tuner therefore puts its container on the model root in ``_prepare_model`` and makes the container
itself the only "target": ``_create_and_replace`` asks it to build the adapter's blocks and hooks. The
from/to selectors are resolved by the container (PEFT's ``target_modules`` never sees them).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_hcp.adapter_keys import BlockKeysMixin
from peft_hcp.errors import MergeNotSupportedError
from peft_hcp.hooked.layer import HookedPluginLayer


class HcpHookedModel(BlockKeysMixin, BaseTuner):
    """Attaches one cross-layer plugin type; a subclass per type is made by registration."""

    prefix: str
    tuner_layer_cls: type[HookedPluginLayer]
    target_module_mapping: dict = {}

    @classmethod
    def container_name(cls) -> str:
        """Attribute of the model root that holds the container: the type name (the prefix without ``_``).

        It must not contain the prefix itself: PEFT's ``delete_adapter`` skips modules whose name does.
        """
        return cls.prefix[:-1]

    def _container(self, model: nn.Module) -> Optional[HookedPluginLayer]:
        return getattr(model, self.container_name(), None)

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        working = copy.copy(peft_config)  # never touch the user's (saved) config
        working.target_modules = [self.container_name()]
        return working

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

    def _check_target_module_exists(self, peft_config: Any, key: str) -> bool:
        return key == self.container_name()

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        target.update_layer(adapter_name, peft_config, parent)

    def _remove_container(self) -> None:
        container = self._container(self.model)
        if container is not None:
            container.remove_hooks()
            delattr(self.model, self.container_name())

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            raise MergeNotSupportedError(
                f"{self.tuner_layer_cls.block_cls.__name__} cannot be merged: a cross-layer plugin computes its "
                "effect from other layers' activations at run time; there is no weight change to fold in. "
                "Use unload() to remove it."
            )
        self._remove_container()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter`` (which removes the adapter's hooks), then drop an emptied container."""
        super().delete_adapter(adapter_name)
        container = self._container(self.model)
        if container is not None and not container.blocks:
            self._remove_container()
        if not self.active_adapters and self.peft_config:
            self.set_adapter(sorted(self.peft_config)[0])
