"""Training checkpoints: adapter sets written to a temporary folder and renamed into place.

Layout of ``<output_dir>/checkpoints/step-000020/``: the adapters as a peft-hcp adapter set
(``peft_hcp.hub``: one PEFT adapter folder per plugin entry, e.g. ``unet/lora1/adapter_config.json`` +
``adapter_model.safetensors``, plus ``adapter_set.json``), ``optimizer.safetensors`` (the optimizer's
tensors) and ``train_state.json`` (step, optimizer scalars). The folder appears under its final name
only when complete and on disk (files and folder fsynced, then ``os.replace`` of ``.tmp-step-...``); a
step saved again swaps the new folder in before the old one is deleted; a run interrupted between the two
renames leaves the old folder aside as ``.old-step-...``, which :func:`latest_checkpoint` renames back. An
interrupted run therefore leaves the previous checkpoint intact, and resuming never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch
from safetensors.torch import save_file

from peft_hcp.adapter_set import load_adapter_weights, read_set, save_adapter
from peft_hcp.base.components import pipeline_components
from peft_hcp.base.files import read_safetensors
from peft_hcp.base.sharding import full_tensor, shard_like
from peft_hcp.errors import CheckpointError


STATE_NAME = "train_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step:06d}")


def save_checkpoint(
    pipe,
    output_dir: str,
    step: int,
    optimizer: torch.optim.Optimizer,
    extra: dict,
    is_main_process: bool = True,
) -> str:
    """Write the checkpoint of ``step`` atomically; returns its folder.

    Under FSDP2 every rank calls it: the adapters and the optimizer state are gathered whole (a collective),
    and only ``is_main_process`` writes, so the checkpoint is the one a single process would write.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = os.path.join(os.path.dirname(final), ".tmp-" + os.path.basename(final))
    if is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    save_adapter(pipe, tmp, is_main_process=is_main_process)
    tensors, scalars = _flatten_optimizer(optimizer)
    if not is_main_process:
        return final
    save_file(tensors, os.path.join(tmp, OPTIMIZER_NAME))
    with open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as handle:
        json.dump({"step": step, "optimizer": scalars, **extra}, handle, indent=2)
    _fsync_tree(tmp)
    aside = None
    if os.path.exists(final):  # swap: the old folder moves aside and goes only once the new one is in
        aside = os.path.join(os.path.dirname(final), ".old-" + os.path.basename(final))
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(os.path.dirname(final))
    if aside is not None:
        shutil.rmtree(aside)
    return final


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: str) -> None:
    """Flush every file and folder under ``folder`` to disk, so a rename never publishes unwritten data."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step in ``output_dir``, or ``None``."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    _recover_swapped(root)
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(root)
        if (m := _STEP_DIR.fullmatch(name)) and os.path.isfile(os.path.join(root, name, STATE_NAME))
    ]
    return os.path.join(root, max(steps)[1]) if steps else None


def _recover_swapped(root: str) -> None:
    """Finish or undo a swap interrupted between its renames (see :func:`save_checkpoint`)."""
    for name in os.listdir(root):
        if not (name.startswith(".old-") and _STEP_DIR.fullmatch(name[len(".old-") :])):
            continue
        aside, final = os.path.join(root, name), os.path.join(root, name[len(".old-") :])
        if os.path.isfile(os.path.join(final, STATE_NAME)):
            shutil.rmtree(aside)  # the new folder is in: the old one only had not been deleted yet
        else:
            os.replace(aside, final)  # the new folder never got in: the old one is the checkpoint


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(pipe, folder: str, optimizer: torch.optim.Optimizer) -> int:
    """Load adapter weights (onto adapters already attached under the same names) and optimizer state.

    Returns the step the checkpoint was taken at. The adapters of the checkpoint must be the ones the
    config attaches: a missing or extra adapter, or a missing weight, is a ``CheckpointError``.
    """
    components = pipeline_components(pipe)
    saved = read_set(folder)
    wanted = {(c, n) for c, m in components.items() for n in (getattr(m, "peft_config", None) or {})}
    found = {(e.component, e.name) for e in saved}
    if found != wanted:
        raise CheckpointError(
            f"{folder} holds adapters {sorted(found)}, but the config attaches {sorted(wanted)}; "
            "use a new output_dir (or resume=false) after changing the plugins."
        )
    for entry in saved:
        load_adapter_weights(components[entry.component], entry.name, os.path.join(folder, entry.subfolder))
    state = read_state(folder)
    _unflatten_optimizer(optimizer, read_safetensors(os.path.join(folder, OPTIMIZER_NAME)), state["optimizer"])
    return int(state["step"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = full_tensor(value).detach().contiguous()
            else:
                scalars["state"].setdefault(str(index), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        param = params[int(index)] if int(index) < len(params) else None
        if param is not None and value.shape == param.shape:  # a moment of a sharded parameter: sharded alike
            value = shard_like(value, param)
        state.setdefault(int(index), {})[name] = value
    for index, values in scalars["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = scalars["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("The checkpoint's optimizer does not match this run's plugins (parameter counts differ).")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
