"""FSDP2 for ``peft-hcp train``: ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N ...``.

accelerate 1.15 runs FSDP only on GPUs, and its FSDP2 takes one model; on a CPU the launch becomes plain CPU
data-parallel, where every rank holds the whole UNet. The trainer therefore reads the launch's FSDP settings
itself (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_OFFLOAD_PARAMS``,
``FSDP_AUTO_WRAP_POLICY``, ``FSDP_TRANSFORMER_CLS_TO_WRAP``), starts accelerate without them (it still runs the
process group, devices, autocast and gradient accumulation), and shards the UNet and the text encoder per block
with :func:`peft_hcp.fsdp.shard_model` on any device; the models never go through DDP. A setting it cannot
honour is an error, never a silent data-parallel run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from peft_hcp.fsdp import shard_model
from peft_hcp.train.settings import SettingsError


_ON = ("true", "1", "yes")
#: accelerate's settings this trainer does not implement ("true" refused). ``FSDP_CPU_RAM_EFFICIENT_LOADING``
#: (on by default) is a loading economy: every rank loads the pipeline whole here, then shards it.
_REFUSED = ("FSDP_ACTIVATION_CHECKPOINTING",)


@dataclass(frozen=True)
class FsdpPlan:
    """How to shard: the launch's FSDP2 settings."""

    reshard_after_forward: bool = True
    offload_params: bool = False
    #: class names of the blocks sharded one by one; ``None``: the models' ``_no_split_modules``
    block_classes: Optional[tuple[str, ...]] = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Optional[FsdpPlan]:
        """The plan of a launch with ``--use_fsdp``, ``None`` without; an unsupported setting is a ``SettingsError``."""
        if env.get("ACCELERATE_USE_FSDP", "false").lower() not in _ON:
            return None
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise SettingsError(f"FSDP version {version} was requested; peft-hcp train runs FSDP2: --fsdp_version 2.")
        refused = [name for name in _REFUSED if env.get(name, "false").lower() in _ON]
        policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
        if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            refused.append(f"FSDP_AUTO_WRAP_POLICY={policy}")
        if refused:
            raise SettingsError(
                f"peft-hcp train does not implement the FSDP setting(s) {refused}; it shards per block "
                "(TRANSFORMER_BASED_WRAP, the models' _no_split_modules or --fsdp_transformer_layer_cls_to_wrap)."
            )
        names = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        blocks = () if policy == "NO_WRAP" else (tuple(n.strip() for n in names.split(",")) if names else None)
        return cls(
            reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _ON,
            offload_params=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _ON,
            block_classes=blocks,
        )


@contextlib.contextmanager
def accelerate_without_fsdp(plan: Optional[FsdpPlan]) -> Iterator[None]:
    """With a plan, hide the launch's FSDP request from accelerate while it starts (the trainer shards itself)."""
    hidden = os.environ.pop("ACCELERATE_USE_FSDP", None) if plan is not None else None
    try:
        yield
    finally:
        if hidden is not None:
            os.environ["ACCELERATE_USE_FSDP"] = hidden


def shard_for_training(
    plan: FsdpPlan, accelerator, models: list[nn.Module], groups: list[dict], mixed_precision: str
) -> list[dict]:
    """Shard ``models`` per block over every process; returns the optimizer ``groups`` with the sharded parameters
    (sharding replaces each parameter). Refuses a launch where FSDP cannot happen."""
    if accelerator.num_processes < 2 or not torch.distributed.is_initialized():
        raise SettingsError(
            f"FSDP was requested, but this run has {accelerator.num_processes} process(es) and no process group: "
            "launch it with accelerate launch --use_fsdp --fsdp_version 2 --num_processes N (N >= 2)."
        )
    if mixed_precision == "fp16":
        raise SettingsError(
            "FSDP with mixed_precision=fp16 (a loss scaler on sharded gradients) is not supported; use bf16."
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    where = {id(p): (index, name) for index, model in enumerate(models) for name, p in model.named_parameters()}
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    offload = {"offload_policy": CPUOffloadPolicy()} if plan.offload_params and accelerator.device.type != "cpu" else {}
    for model in models:
        shard_model(
            model,
            mesh,
            block_classes=plan.block_classes,
            reshard_after_forward=plan.reshard_after_forward,
            **offload,
        )
    return [
        {**group, "params": [models[i].get_parameter(name) for i, name in (where[id(p)] for p in group["params"])]}
        for group in groups
    ]
