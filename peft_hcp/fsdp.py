"""FSDP2 for adapted models: shard the frozen base per block, and measure what each rank holds.

Any peft-hcp kind trains under torch's ``fully_shard``: a ``PeftModel``, or a model carrying an adapter set in
place. The plugins need no care of their own as long as every host layer is sharded together with the block
that calls it (a LoHa reads its host's weight inside the host's wrapper; a ControlNet's hooks run inside the
UNet's forward). :func:`shard_model` therefore shards per *block*: every module whose class the models inside
name in ``_no_split_modules`` (diffusers' and transformers' own list of modules that must stay whole), which
also catches the blocks of a plugin's trainable copy (the ControlNet's encoder copy), then the root, which
takes the rest (the plugin containers, their heads, embeddings). Saving is collective: see
:mod:`peft_hcp.base.sharding`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

from peft_hcp.base.sharding import is_sharded


def block_class_names(model: nn.Module) -> set[str]:
    """The class names every model inside ``model`` declares in ``_no_split_modules``."""
    return {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}


def shard_model(
    model: nn.Module,
    mesh: Any = None,
    *,
    block_classes: Optional[Iterable[str]] = None,
    reshard_after_forward: bool = True,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """``fully_shard`` each block of ``model`` (innermost first), then ``model`` itself; returns ``model``.

    ``block_classes`` (class names) replaces the blocks found by :func:`block_class_names`; a model with none
    is sharded as one group. ``mesh`` and the other keywords go to ``fully_shard`` (e.g. a CPU mesh:
    ``init_device_mesh("cpu", (world_size,))``). Call it after the adapters are attached and before the
    optimizer is built: sharding replaces every parameter by a ``DTensor``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(block_classes) if block_classes is not None else block_class_names(model)
    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in names and not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    if not isinstance(model, FSDPModule):
        fully_shard(model, mesh=mesh, **fully_shard_kwargs)  # the root: torch keeps it gathered until backward
    return model


def held_bytes(model: nn.Module, trainable: Optional[bool] = None) -> tuple[int, int]:
    """``(bytes this process holds, bytes of the whole tensors)`` of ``model``'s parameters: all of them, or
    only the trainable (``True``) or frozen (``False``) ones."""
    held = whole = 0
    for param in model.parameters():
        if trainable is not None and param.requires_grad != trainable:
            continue
        local = param.to_local() if is_sharded(param) else param
        held += local.numel() * local.element_size()
        whole += param.numel() * param.element_size()
    return held, whole


__all__ = ["block_class_names", "held_bytes", "shard_model"]
