"""``HcpTuner``: the ``BaseTuner`` mechanics every peft-hcp kind shares.

*Checkpoint keys.* A model key reads ``<host>[.base_layer…].<type>_blocks.<adapter>.<param path>``. The
checkpoint key drops the adapter name (so ``load_adapter(..., adapter_name="other")`` loads into "other",
which PEFT's default translation gets wrong for nested blocks) and the ``.base_layer`` levels of other
adapters' wrappers around this one (so two kinds stacked on one layer load back in either attach order).
Loading is strict: a checkpoint with missing, unknown or mis-shaped weights is refused with the names,
where PEFT would load it half (``strict=False``).

*Refusals change nothing.* ``inject_adapter`` (behind ``get_peft_model``, ``PeftModel.add_adapter``,
``inject_adapter_in_model`` and diffusers' ``add_adapter``) runs under :func:`~peft_hcp.base.snapshot.all_or_nothing`:
when any step refuses, the model and the tuner are put back, the adapter's ``peft_config`` entry and diffusers'
``_hf_peft_config_loaded`` included (PEFT and diffusers set those before injecting). A config read from a checkpoint
(``PeftModel.from_pretrained`` / ``load_adapter``, ``peft_hcp.load_adapter``) names its weights file
(``checkpoint_file``): that file's keys and shapes are checked against the new adapter inside the same
``inject_adapter``, so weights that will be refused refuse the attach, and a failed load leaves no half-attached
adapter. Merging and unloading are all or nothing too.

*Sharded models.* On a model sharded with FSDP2 the adapter's tensors are gathered whole when its state dict is
taken (every rank calls ``save_pretrained(..., is_main_process=rank == 0)``), and whole tensors are sliced to the
model's shards when loaded, so files are the same as from one process.

*Removing adapters.* ``delete_adapter`` and ``unload`` leave no empty tuner layer behind and put every host
object back; ``unload`` also unwraps PEFT's ``modules_to_save`` copies, as PEFT's own tuners do.
"""

from __future__ import annotations

import re
from typing import Any, Optional, cast

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from peft_hcp.base.blocks import BlockLayer
from peft_hcp.base.config import HcpConfig
from peft_hcp.base.fit import check_state_dict
from peft_hcp.base.names import check_adapter_name
from peft_hcp.base.preflight import check_against_file
from peft_hcp.base.sharding import full_tensors, shard_like
from peft_hcp.base.snapshot import all_or_nothing
from peft_hcp.registry import bind_type


#: the prefix of the keys in a checkpoint saved from a ``PeftModel``
_PEFT_PREFIX = "base_model.model."


class HcpTuner(BaseTuner):
    """Base of every peft-hcp tuner. A concrete one names its layer and config classes, which registers the
    PEFT type: ``class HcpLoraModel(HcpSingleModel, layer_cls=HcpLoraLayer, config_cls=HcpLoraConfig)``."""

    prefix: str
    tuner_layer_cls: type[BlockLayer]
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - PEFT's class attribute, never mutated

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
        """PEFT's ``inject_adapter``, all or nothing: a refusal leaves ``model`` as it was. A config read from a
        checkpoint is first checked against that checkpoint's header, before anything is allocated."""
        config = cast(HcpConfig, self.peft_config[adapter_name])
        with all_or_nothing(self, model) as before:
            before.forget_adapter(adapter_name, self, model)  # PEFT (and diffusers) announced it already
            check_adapter_name(adapter_name)
            if config.checkpoint_file is not None:
                check_against_file(model, config, adapter_name, config.checkpoint_file)
            self._check_host(model, config)
            super().inject_adapter(model, adapter_name, *args, **kwargs)

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
        return cls._check_checkpoint(model, config, adapter_name, state_dict, "The checkpoint")

    @classmethod
    def _check_checkpoint(
        cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor], source: str
    ) -> dict[str, torch.Tensor]:
        """PEFT's key translation, then the strict check: raise ``CheckpointError`` naming what does not fit.

        Keys are named as the checkpoint has them (no adapter name, no ``base_model.model.``)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        attr = f".{cls.tuner_layer_cls.blocks_attr}."
        marker = f"{attr}{adapter_name}."
        model_state = {k: v for k, v in model.state_dict().items() if marker in k}
        saved_as = {
            k: cls._remove_adapter_name_from_key(k, adapter_name).removeprefix(_PEFT_PREFIX) for k in model_state
        }
        check_state_dict(
            {saved_as.get(k, k.removeprefix(_PEFT_PREFIX)): v for k, v in remapped.items() if attr in k},
            {saved_as[k]: v for k, v in model_state.items()},
            source,
            f"this model's {cls.tuner_layer_cls.block_cls.__name__} adapter {adapter_name!r}",
        )
        return {key: shard_like(value, model_state.get(key)) for key, value in remapped.items()}

    # -- removing adapters ---------------------------------------------------------------------

    def _own_layers(self) -> list[tuple[str, BlockLayer]]:
        """This type's tuner layers, nested ones included (another type's layer may wrap one)."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]

    def _merge_layers(self, safe_merge: bool, adapter_names: Optional[list[str]]) -> None:
        """Fold the adapters into the host weights, or refuse before changing anything: per kind."""
        raise NotImplementedError

    def _host_weights(self) -> list[torch.Tensor]:
        """The weights a merge writes into: the float ones of the layers this type's wrappers hold. A merge
        replaces a quantized weight (a tensor subclass) by a new object instead, which the module tree's
        snapshot puts back (see :mod:`peft_hcp.quant.hosts`)."""
        return [
            p
            for _, layer in self._own_layers()
            if hasattr(layer, "base_layer")
            for p in layer.get_base_layer().parameters()
            if type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
        ]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, all or nothing: a refusal (``safe_merge``, a kind that cannot merge, a layer
        that cannot take its block) leaves every host weight as it was."""
        with all_or_nothing(self.model, values=self._host_weights()):
            self._merge_layers(safe_merge, adapter_names)

    def _unload_and_optionally_merge(  # type: ignore[override]  # PEFT's base says None; its merge_and_unload returns this
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        with all_or_nothing(self.model, values=self._host_weights() if merge else ()):
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
