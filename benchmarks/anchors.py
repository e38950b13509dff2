"""The anchors: what HCP-Diffusion and LyCORIS themselves build on the same layers of the same UNet.

They are reference columns beside PEFT, measured in the same process. Install them with
``pip install -e ".[bench]"``; without them their columns are skipped with a one-line reason.

Both are applied as their own code applies them: HCP-Diffusion's ``LoraLayer.wrap_model`` with the
host's parent (the patch container replaces the host, as its ``CfgWDPluginParser`` does), LyCORIS's
``LohaModule`` / ``LokrModule`` with ``apply_to()`` (the host's ``forward`` is replaced).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from diffusers import UNet2DConditionModel
from torch import nn


#: how to install what the anchor columns (and the plot) need
INSTALL = "pip install -e '.[bench]'"


class Skip(Exception):
    """A side cannot run here (a package is missing, no GPU ...); the message says why."""


def need(module: str, install: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`Skip` saying, in one line, what is missing (and how to install it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"{module} is not available ({exc})".splitlines()[0]
        raise Skip(f"{reason}; {install}" if install else reason) from exc


def _anchor(module: str) -> ModuleType:
    return need(module, INSTALL)


def hcpdiff_lora(unet: UNet2DConditionModel, names: list[str], rank: int, dropout: float) -> UNet2DConditionModel:
    """HCP-Diffusion 2.6's LoRA (``hcpdiff.models.lora_layers_patch.LoraLayer``) on ``names`` of ``unet``.

    HCP-Diffusion adds ``up @ down * alpha / rank`` to the host's weight and computes the host once;
    its dropout acts on the layer's whole output. ``unet`` is changed in place and returned.
    """
    lora_layer = _anchor("hcpdiff.models.lora_layers_patch").LoraLayer
    modules = dict(unet.named_modules())
    for name in names:
        parent, _, host_name = name.rpartition(".")
        hyper = {"rank": rank, "alpha": rank, "dropout": dropout}
        lora_layer.wrap_model("lora1", modules[name], parent_block=modules[parent], host_name=host_name, **hyper)
    _check_count(unet, lora_layer, names)
    return unet


def lycoris(unet: UNet2DConditionModel, names: list[str], algo: str, rank: int) -> nn.ModuleList:
    """LyCORIS's ``algo`` (``"loha"`` or ``"lokr"``) module on ``names`` of ``unet``; returns the modules.

    ``unet``'s hosts then run through the LyCORIS modules; the returned list holds their parameters.
    """
    module_cls = {"loha": "LohaModule", "lokr": "LokrModule"}[algo]
    cls = getattr(_anchor(f"lycoris.modules.{algo}"), module_cls)
    modules = nn.ModuleList()
    for name in names:
        module = cls(f"lycoris_{name.replace('.', '_')}", unet.get_submodule(name), 1.0, rank, rank)
        module.apply_to()
        modules.append(module)
    return modules


def _check_count(model: nn.Module, block_cls: type, names: list[str]) -> None:
    count = sum(isinstance(m, block_cls) for m in model.modules())
    if count != len(names):
        raise AssertionError(f"{block_cls.__name__} wrapped {count} layers, expected {len(names)}")
