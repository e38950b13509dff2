"""``HcpTuner``: the ``BaseTuner`` mechanics every peft-hcp kind shares.

*Checkpoint keys.* A model key reads ``<host>[.base_layer…].<type>_blocks.<adapter>.<param path>``. The
checkpoint key drops the adapter name (so ``load_adapter(..., adapter_name="other")`` loads into "other",
which PEFT's default translation gets wrong for nested blocks) and the ``.base_layer`` levels of other
adapters' wrappers around this one (so two kinds stacked on one layer load back in either attach order).
Loading is strict: a checkpoint with missing, unknown or mis-shaped weights is refused with the names,
where PEFT would load it half (``strict=False``).

*Refusals change nothing.* ``inject_adapter`` (behind ``get_peft_model``, ``PeftModel.add_adapter``,
``inject_adapter_in_model`` and diffusers' ``add_adapter``) snapshots the model and restores it when any step
refuses: module tree, ``requires_grad``, hooks, the adapter's ``peft_config`` entry, and diffusers'
``_hf_peft_config_loaded`` when no adapter is left (diffusers sets it before injecting). An adapter whose config
was read from a checkpoint (``PeftModel.load_adapter``, ``from_pretrained``, ``peft_hcp.load_adapter``) is
removed again when that checkpoint's weights are refused, so a failed load leaves no half-attached adapter.

*Sharded models.* On a model sharded with FSDP2 the adapter's tensors are gathered whole when its state dict is
taken (every rank calls ``save_pretrained(..., is_main_process=rank == 0)``), and whole tensors are sliced to the
model's shards when loaded, so files are the same as from one process.

*Removing adapters.* ``delete_adapter`` and ``unload`` leave no empty tuner layer behind and put every host
object back; ``unload`` also unwraps PEFT's ``modules_to_save`` copies, as PEFT's own tuners do.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, ClassVar, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from peft_hcp.base.blocks import BlockLayer
from peft_hcp.base.sharding import full_tensors, shard_like
from peft_hcp.base.snapshot import ModelSnapshot
from peft_hcp.errors import CheckpointError, few
from peft_hcp.registry import bind_type


#: the model as it was before an adapter whose config was read from a checkpoint was attached, until its
#: weights are loaded (keyed by the config's id)
_attached_for_load: dict[int, ModelSnapshot] = {}


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

    def _add_adapter_to(
        self, target: nn.Module, target_name: str, parent: nn.Module, config, adapter_name: str
    ) -> None:
        """Attach ``adapter_name`` at ``target`` (called ``target_name`` in ``parent``): per kind."""
        raise NotImplementedError

    # -- attaching ----------------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's ``inject_adapter``, all or nothing: a refusal leaves ``model`` as it was."""
        snapshot = ModelSnapshot.take(model)
        targeted = list(self.targeted_module_names)
        config = self.peft_config[adapter_name]
        try:
            self._check_host(model, config)
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            snapshot.restore()
            self.targeted_module_names[:] = targeted
            self.peft_config.pop(adapter_name, None)
            if not getattr(model, "peft_config", None):
                model.__dict__.pop("peft_config", None)
                model.__dict__.pop("_hf_peft_config_loaded", None)  # diffusers' add_adapter set it before calling us
            raise
        if getattr(config, "awaiting_checkpoint", False):
            _attached_for_load[id(config)] = snapshot
            weakref.finalize(config, _attached_for_load.pop, id(config), None)

    def _check_host(self, model: nn.Module, config: Any) -> None:
        """Refuse a model this kind cannot attach to, before anything changes: per kind."""

    # -- checkpoint keys -----------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """PEFT's selection of the adapter's tensors, gathered whole from a model sharded with FSDP2 (a
        collective there: behind ``save_pretrained`` and ``get_peft_model_state_dict``, every rank calls it)."""
        state = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return full_tensors(state)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        attr = re.escape(cls.tuner_layer_cls.blocks_attr)
        return re.sub(
            rf"(?:\.base_layer)*\.{attr}\.{re.escape(adapter_name)}\.",
            f".{cls.tuner_layer_cls.blocks_attr}.",
            key,
            count=1,
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        try:
            remapped = cls._check_checkpoint(model, config, adapter_name, state_dict)
        except CheckpointError:
            before = _attached_for_load.pop(id(config), None)
            if before is not None:  # attached for this load: take it off again
                _discard_adapter(model, adapter_name)
                before.restore()  # the trainability the attach changed
            raise
        if _attached_for_load.pop(id(config), None) is not None:
            config.awaiting_checkpoint = False  # loaded: from now on the adapter is the user's
        return remapped

    @classmethod
    def _check_checkpoint(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key translation, then the strict check: raise ``CheckpointError`` naming what does not fit."""
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
        return {key: shard_like(value, model_state.get(key)) for key, value in remapped.items()}

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


def _discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from a ``PeftModel`` or from a model adapted in place."""
    from peft import PeftModel

    from peft_hcp.adapter_set import detach  # the in-place bookkeeping lives there

    if isinstance(model, PeftModel):
        model.delete_adapter(adapter_name)
        base = model.base_model.model
        if not getattr(base, "peft_config", None):  # its last adapter: from_pretrained failed
            base.__dict__.pop("peft_config", None)
    else:
        detach(model, adapter_name)
