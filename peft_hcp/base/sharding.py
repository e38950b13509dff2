"""Tensors of a model sharded with FSDP2 (``DTensor`` s): gathered whole to save, sharded again to load.

``fully_shard`` replaces every parameter by a ``DTensor`` of which a rank holds one slice, so a state dict
read from a sharded model cannot be written to a file. :func:`full_tensors` gathers the slices; it is a
collective: every rank calls it, on the same tensors in the same order, and each gets the whole tensors
(only the main process then writes them). Only the tensors asked for are gathered — an adapter's, never the
frozen base.
"""

from __future__ import annotations

from typing import Any

import torch


def _dtensor_cls() -> Any:
    """torch's ``DTensor`` class, or ``None`` where torch is built without distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a slice of a tensor sharded over processes)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole, on the CPU when it was sharded (a collective then); a plain tensor as it is."""
    return tensor.full_tensor().cpu() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every sharded value gathered whole (see the module docstring: a collective)."""
    return {key: full_tensor(value) for key, value in state.items()}


def shard_like(tensor: torch.Tensor, reference: Any) -> torch.Tensor:
    """The whole ``tensor`` sliced as ``reference`` (a ``DTensor``) is; ``tensor`` itself when ``reference`` is not
    sharded. Every rank holds the whole tensor (read from the same file), so nothing is sent between ranks."""
    if not is_sharded(reference) or is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(local, reference.device_mesh, reference.placements, src_data_rank=None)


def is_main_process() -> bool:
    """Rank 0 of the default process group, or ``True`` when no group is initialised."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
