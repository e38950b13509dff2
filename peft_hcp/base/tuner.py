"""``HcpTuner``: the ``BaseTuner`` mechanics every peft-hcp kind shares.

*Checkpoint keys.* A model key reads ``<host>[.base_layer…].<type>_blocks.<adapter>.<param path>``. The
checkpoint key drops the adapter name (so ``load_adapter(..., adapter_name="other")`` loads into "other",
which PEFT's default translation gets wrong for nested blocks) and the ``.base_layer`` levels of other
adapters' wrappers around this one (so two kinds stacked on one layer load back in either attach order).
Loading is strict: a checkpoint with missing, unknown or mis-shaped weights is refused with the names,
where PEFT would load it half (``strict=False``).

*Removing adapters.* ``delete_adapter`` and ``unload`` leave no empty tuner layer behind and put every host
object back; ``unload`` also unwraps PEFT's ``modules_to_save`` copies, as PEFT's own tuners do.
"""

from __future__ import annotations

import re
from typing import ClassVar, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from peft_hcp.base.blocks import BlockLayer
from peft_hcp.errors import CheckpointError, few
from peft_hcp.registry import bind_type


class HcpTuner(BaseTuner):
    """Base of every peft-hcp tuner. A concrete one names its layer and config classes, which registers the
    PEFT type: ``class HcpLoraModel(HcpSingleModel, layer_cls=HcpLoraLayer, config_cls=HcpLoraConfig)``."""

    prefix: ClassVar[str]
    tuner_layer_cls: ClassVar[type[BlockLayer]]
    target_module_mapping: ClassVar[dict] = {}

    def __init_subclass__(
        cls, *, layer_cls: Optional[type[BlockLayer]] = None, config_cls: Optional[type] = None, **kwargs
    ) -> None:
        super().__init_subclass__(**kwargs)
        if layer_cls is not None:
            cls.tuner_layer_cls = layer_cls
            cls.prefix = layer_cls.type_name + "_"
        if config_cls is not None:  # a concrete type: register it with PEFT
            bind_type(cls, config_cls)

    def _create_and_replace(
        self,
        peft_config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        self._add_adapter_to(target, target_name, parent, peft_config, adapter_name)

    def _add_adapter_to(self, target: nn.Module, target_name: str, parent: nn.Module, config, adapter_name: str) -> None:
        """Attach ``adapter_name`` at ``target`` (called ``target_name`` in ``parent``): per kind."""
        raise NotImplementedError

    # -- checkpoint keys -----------------------------------------------------------------------

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        attr = re.escape(cls.tuner_layer_cls.blocks_attr)
        return re.sub(rf"(?:\.base_layer)*\.{attr}\.{re.escape(adapter_name)}\.", f".{cls.tuner_layer_cls.blocks_attr}.", key, count=1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        attr = f".{cls.tuner_layer_cls.blocks_attr}."
        marker = f"{attr}{adapter_name}."
        model_state = {k: v for k, v in model.state_dict().items() if marker in k}
        missing = sorted(set(model_state) - set(remapped))
        unexpected = sorted(k for k in remapped if attr in k and k not in model_state)
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint does not fit this model's {cls.tuner_layer_cls.block_cls.__name__} adapter "
                f"{adapter_name!r}: missing {few(missing)}; unexpected {few(unexpected)}. "
                "Was it saved from a model of another architecture, or with other layers selected?"
            )
        wrong = [
            f"{key.replace(marker, attr)}: checkpoint {tuple(remapped[key].shape)} vs model {tuple(value.shape)}"
            for key, value in model_state.items()
            if remapped[key].shape != value.shape
        ]
        if wrong:
            raise CheckpointError(
                f"The checkpoint was made for a model of another shape; {len(wrong)} weight(s) differ: "
                + "; ".join(wrong[:5])
            )
        return remapped

    # -- removing adapters ---------------------------------------------------------------------

    def _own_layers(self) -> list[tuple[str, BlockLayer]]:
        """This type's tuner layers, nested ones included (another type's layer may wrap one)."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]

    def _merge_layers(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Fold the adapters into the host weights, or refuse before changing anything: per kind."""
        raise NotImplementedError

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, all or nothing: a refusal (``safe_merge``, a kind that cannot merge)
        comes before any layer changes."""
        self._merge_layers(safe_merge, adapter_names)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._merge_layers(safe_merge, adapter_names)
        for name, layer in reversed(self._own_layers()):  # inner layers first: names stay valid
            layer.remove_from(self.model, name)
        for name, module in reversed(list(self.model.named_modules())):
            if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, as PEFT's tuners unload them
                parent, _, attr = name.rpartition(".")
                unloaded = module.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                setattr(self.model.get_submodule(parent), attr, unloaded)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter``, then remove layers left without adapters, restoring the hosts."""
        super().delete_adapter(adapter_name)
        for name, layer in reversed(self._own_layers()):
            if not layer.blocks:
                layer.remove_from(self.model, name)
        if not self.active_adapters and self.peft_config:
            # PEFT takes the new active adapter from the first layer it meets, which may hold none
            self.set_adapter(sorted(self.peft_config)[0])

