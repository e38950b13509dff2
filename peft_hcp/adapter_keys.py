"""Checkpoint keys of peft-hcp adapters: translation without the adapter name, and strict loading.

Every peft-hcp tuner layer keeps its blocks in a ``ModuleDict`` named ``<type>_blocks`` keyed by adapter
name, so a model key reads ``...<type>_blocks.<adapter>.<param path>``. PEFT's default translation only
strips an adapter name in the second-to-last position; with nested blocks it would leave the name in and
``load_adapter(..., adapter_name="other")`` would silently load into the wrong adapter. PEFT also loads
with ``strict=False``; here a checkpoint that does not fit (missing, unknown or mis-shaped weights) is
refused with the names, instead of being half-loaded.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key
from torch import nn

from peft_hcp.errors import CheckpointError


class BlockKeysMixin:
    """For a ``BaseTuner`` whose ``tuner_layer_cls`` has ``blocks_attr`` and ``block_cls``; list it first."""

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        attr = f".{cls.tuner_layer_cls.blocks_attr}."
        marker = f"{attr}{adapter_name}."
        if marker in key:
            return key.replace(marker, attr, 1)
        return _remove_adapter_name_from_state_dict_key(key, adapter_name)

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
                f"{adapter_name!r}: missing {_few(missing)}; unexpected {_few(unexpected)}. "
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


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
