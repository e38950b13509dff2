"""Hot-swapping adapters in place, also on a compiled model: PEFT's hotswap API for every peft-hcp kind.

PEFT's ``prepare_model_for_compiled_hotswap`` and ``hotswap_adapter`` (``peft.utils.hotswap``) know PEFT's own
LoRA only: they look for its ``LoraLayer`` and its ``lora_A`` / ``lora_B`` weights and compare ``LoraConfig``
fields, so they refuse every other type. The functions here have the same names and signatures:

* :func:`prepare_model_for_compiled_hotswap`, after the first adapter is loaded and before ``torch.compile``: each
  block's ``scaling`` moves into a 0-dim buffer that is changed in place from then on, and (given
  ``target_rank``) the low-rank blocks (LoRA, DoRA, LoHa, LoKr) are zero-padded to that rank. A compiled graph
  then reads the scale as an input and keeps its shapes, so adapters of other ranks and alphas swap in without
  recompiling.
* :func:`hotswap_adapter` (a folder or Hub repo) and :func:`hotswap_adapter_from_state_dict` copy another adapter's
  weights into the blocks of the adapter ``adapter_name`` (zero-padding a lower rank) and set its scale;
  ``peft_hcp.load_adapter(pipe, path, hotswap=True)`` does it for a whole adapter set.

A swap happens in place or not at all. Another kind, a config that computes differently (a field other than the
rank's, the scale's and the layer selection's differs, or a cross-layer plugin's layers), other layers (a weight
missing or unknown), a rank above the padded one, another shape, a merged adapter: each is refused, naming the
problem, before any weight changes. The model's ``peft_config`` keeps the config of the adapter loaded first (as
with PEFT's hotswap): a swapped model is for serving; keep the adapters' own files for saving.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from peft_hcp.adapter_set import SetEntry, read_config, resolve_source
from peft_hcp.base.blocks import BlockLayer, WeightedBlock
from peft_hcp.base.components import pipeline_components
from peft_hcp.base.files import check_adapter_folder, read_safetensors
from peft_hcp.errors import CheckpointError, few
from peft_hcp.single.lowrank import LowRankBlock, LowRankConfig


_PEFT_PREFIX = "base_model.model."
#: config fields a swapped-in adapter may change: its rank and scale, how it was trained and recorded, and the
#: layer selection of a single-layer kind (its layers are compared through the names of its weights)
_FREE_FIELDS = frozenset(
    {
        "r",
        "alpha",
        "rank_pattern",
        "alpha_pattern",
        "alpha_auto_scale",
        "dropout",
        "init_weights",
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "peft_hcp_version",
        "checkpoint_file",  # where this process read the config from
        "auto_mapping",
        "task_type",
        "target_modules",
        "exclude_modules",
        "exclude_key",
        "exclude_classes",
    }
)


def _uncompiled(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


def _weighted_blocks(module: nn.Module) -> list[WeightedBlock]:
    return [
        block
        for layer in module.modules()
        if isinstance(layer, BlockLayer)
        for name in layer.blocks
        for block in layer._blocks_of(name)
    ]


def prepare_model_for_compiled_hotswap(
    model: Any,
    *,
    target_rank: Optional[int] = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make ``model`` (a ``PeftModel``, a model with adapters in place, or a pipeline) ready to be compiled and then
    hot-swapped: scales in buffers, low-rank blocks zero-padded to ``target_rank`` (the largest rank to come).

    ``config`` (one config or a dict of them, e.g. ``model.peft_config``) gets ``r = target_rank`` and the alpha
    that keeps its scale (an attached config with per-layer patterns: alphas per layer name). Call it after the
    first adapter is loaded and before ``torch.compile`` (``check_compiled`` says what to do otherwise, as in
    PEFT). Nothing changes when a block's rank is above ``target_rank``.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled should be one of 'error', 'warn' or 'ignore', got {check_compiled!r}.")
    modules = list(pipeline_components(model).values())
    if any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) for m in modules):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model.")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap got a compiled model: it will likely recompile.", stacklevel=2
            )
    blocks = [block for module in modules for block in _weighted_blocks(_uncompiled(module))]
    if not blocks:
        raise ValueError(
            "No peft-hcp adapter layers found on the model: call prepare_model_for_compiled_hotswap after loading "
            "the first adapter and before compiling."
        )
    lowrank = [block for block in blocks if isinstance(block, LowRankBlock)]
    if target_rank is not None:
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise ValueError(f"target_rank must be a positive int, got {target_rank!r}.")
        above = sorted(
            {f"{b.adapter_name!r} ({type(b).__name__}, rank {b.rank})" for b in lowrank if b.rank > target_rank}
        )
        if above:
            raise ValueError(f"target_rank {target_rank} is below the rank of adapter(s) {few(above)}.")
    for block in blocks:
        block.hold_scaling_in_buffer()
    if target_rank is None:
        return
    for block in lowrank:
        block.pad_rank(target_rank)
    scales = _layer_scales(modules)
    for each in _configs(config):
        patterned = isinstance(each, LowRankConfig) and (each.rank_pattern or each.alpha_pattern)
        if patterned and id(each) in scales:  # alphas per layer name take the patterns' place
            each.set_rank(target_rank, scales[id(each)])
        elif isinstance(getattr(each, "r", None), int) and not isinstance(each.r, bool):
            if getattr(each, "alpha_auto_scale", False):
                each.alpha = each.alpha * target_rank / each.r
            each.r = target_rank


def _layer_scales(modules: list[nn.Module]) -> dict[int, dict[str, float]]:
    """``{id(config): {layer name: scale}}`` of the low-rank adapters on ``modules``, by the config attached."""
    scales: dict[int, dict[str, float]] = {}
    for module in modules:
        module = _uncompiled(module)
        configs = getattr(module, "peft_config", None) or {}
        for name, layer in module.named_modules():
            if isinstance(layer, BlockLayer):
                for adapter, block in layer.blocks.items():
                    if isinstance(block, LowRankBlock) and adapter in configs:
                        by_layer = scales.setdefault(id(configs[adapter]), {})
                        by_layer[name.removeprefix(_PEFT_PREFIX)] = block.base_scaling
    return scales


def _configs(config: Any) -> Iterable[Any]:
    if not config:
        return []
    return config.values() if isinstance(config, dict) else [config]


@dataclass
class _Swap:
    """What swapping one adapter writes, planned before anything changes: weights and low-rank scales."""

    weights: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scales: list[tuple[WeightedBlock, float]] = field(default_factory=list)

    def apply(self) -> None:
        with torch.no_grad():
            for param, value in self.weights:
                param.zero_()
                param[tuple(slice(0, n) for n in value.shape)].copy_(value)
        for block, base_scaling in self.scales:
            weight = float(block.scaling) / block.base_scaling if block.base_scaling else 1.0
            block.base_scaling = base_scaling
            block.set_scaling(base_scaling * weight)


def _plan(root: nn.Module, adapter_name: str, config: Any, state_dict: dict[str, torch.Tensor]) -> _Swap:
    """Check that ``state_dict`` (checkpoint keys) swaps into ``adapter_name`` in place; what to write."""
    configs = getattr(root, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"{type(root).__name__} has no adapter {adapter_name!r} to swap; it has {sorted(configs)}.")
    current = configs[adapter_name]
    if current.peft_type != config.peft_type:
        raise ValueError(
            f"Cannot hot-swap a {config.peft_type.value} adapter into {adapter_name!r}, a {current.peft_type.value} "
            "adapter: only an adapter of the same kind swaps in place."
        )
    differ = [
        f"{f.name}: {getattr(current, f.name)!r} vs {getattr(config, f.name)!r}"
        for f in fields(current)
        if f.name not in _FREE_FIELDS and getattr(current, f.name) != getattr(config, f.name, None)
    ]
    if differ:
        raise ValueError(
            f"Cannot hot-swap into {adapter_name!r}: the configs compute differently ({'; '.join(differ)})."
        )
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[current.peft_type]
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, BlockLayer) and adapter_name in m.blocks]
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"Cannot hot-swap {adapter_name!r}: it is merged into the base weights; unmerge it first.")
    targets: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    swap = _Swap()
    for name, layer in layers:
        holder = layer.blocks[adapter_name]
        for param_name, tensor in holder.state_dict(keep_vars=True).items():
            key = tuner._remove_adapter_name_from_key(
                f"{name}.{layer.blocks_attr}.{adapter_name}.{param_name}", adapter_name
            )
            targets[key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key] = (holder, param_name, tensor)
        if isinstance(holder, LowRankBlock):
            layer_config = config.for_layer(name.removeprefix(_PEFT_PREFIX))
            swap.scales.append((holder, holder.scale_for(layer_config, layer.get_base_layer())))
    incoming = {key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key: v for key, v in state_dict.items()}
    missing, unexpected = sorted(set(targets) - set(incoming)), sorted(set(incoming) - set(targets))
    if missing or unexpected:
        raise CheckpointError(
            f"Cannot hot-swap into {adapter_name!r}: the new adapter has other weights (other layers, or another "
            f"structure): missing {few(missing)}; unexpected {few(unexpected)}."
        )
    wrong = []
    for key, (holder, param_name, tensor) in targets.items():
        value = incoming[key]
        if not _fits(holder, param_name, tensor, value):
            wrong.append(f"{key}: {tuple(value.shape)} into {tuple(tensor.shape)}")
        swap.weights.append((tensor, value.to(device=tensor.device, dtype=tensor.dtype)))
    if wrong:
        raise CheckpointError(
            f"Cannot hot-swap into {adapter_name!r} in place: {len(wrong)} weight(s) do not fit (a rank above the "
            f"padded one needs prepare_model_for_compiled_hotswap(target_rank=...) first): " + "; ".join(wrong[:5])
        )
    return swap


def _fits(holder: nn.Module, name: str, tensor: torch.Tensor, value: torch.Tensor) -> bool:
    """The same shape, or (a low-rank block) smaller along the rank dimensions only: zero-padded in."""
    if value.dim() != tensor.dim():
        return False
    dims = holder.pad_dims(name) if isinstance(holder, LowRankBlock) else ()
    return all(v == t or (d in dims and v <= t) for d, (v, t) in enumerate(zip(value.shape, tensor.shape)))


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any
) -> None:
    """Swap the weights of ``state_dict`` (keyed as a saved adapter file, or as ``get_peft_model_state_dict``
    returns them) and the scale of ``config`` into the adapter ``adapter_name`` of ``model``, in place."""
    _plan(_uncompiled(model), adapter_name, config, state_dict).apply()


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Replace the weights and scale of the adapter ``adapter_name`` of ``model`` (compiled or not) by those of
    the PEFT adapter folder or Hub repo ``model_name_or_path``, in place; the name stays.

    ``kwargs``: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``. Weights are read from
    safetensors only.
    """
    config, weights = _read_adapter(model_name_or_path, torch_device, **kwargs)
    hotswap_adapter_from_state_dict(model, weights, adapter_name, config)


def _read_adapter(
    path_or_repo_id: str, torch_device: Optional[str] = None, subfolder: Optional[str] = None, **hub: Any
) -> tuple[Any, dict[str, torch.Tensor]]:
    folder = resolve_source(path_or_repo_id, **hub)
    return read_adapter_folder(os.path.join(folder, subfolder) if subfolder else folder, torch_device)


def read_adapter_folder(folder: str, torch_device: Union[str, torch.device, None] = None) -> tuple[Any, dict]:
    """The config and weights of a PEFT adapter folder of a registered type (safetensors only)."""
    check_adapter_folder(folder)
    config = read_config(folder)
    weights = read_safetensors(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    if torch_device is not None:
        weights = {key: value.to(torch_device) for key, value in weights.items()}
    return config, weights


def hotswap_entries(placed: list[tuple[SetEntry, nn.Module]], folder: str) -> None:
    """Swap every entry of an adapter set into the adapter of that name on its module: all are checked before
    any is swapped (``peft_hcp.load_adapter(..., hotswap=True)``)."""
    swaps = []
    for entry, module in placed:
        config, weights = read_adapter_folder(os.path.join(folder, entry.subfolder) if entry.subfolder else folder)
        swaps.append(_plan(_uncompiled(module), entry.name, config, weights))
    for swap in swaps:
        swap.apply()


__all__ = [
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
    "read_adapter_folder",
]
