"""ControlNet plugins <-> diffusers' ControlNet classes, both ways.

* :func:`export_controlnet` writes a plugin as a ``ControlNetModel`` / ``SD3ControlNetModel`` /
  ``FluxControlNetModel`` folder (``save_pretrained``: ``config.json`` + safetensors) that the stock
  diffusers ControlNet pipelines load, computing what the plugin computes. The adapter weight is not
  part of it: pass it as the pipeline's ``controlnet_conditioning_scale``.
* :func:`import_controlnet` attaches a published diffusers ControlNet to its base model as a plugin
  adapter, to fine-tune it like any other adapter. Its config must be the one the plugin would have on
  that host (same base architecture, no union modes, no condition-image hint block for Flux); anything
  else is refused, naming the differing entries, before the host is touched.
  In place instead: ``host.add_adapter(controlnet_config(cn), name)``, then ``load_controlnet(host, cn, name)``.
"""

from __future__ import annotations

import os

from diffusers import (
    ControlNetModel,
    FluxControlNetModel,
    ModelMixin,
    SD3ControlNetModel,
)
from peft import PeftModel, get_peft_model
from torch import nn

from peft_hcp.adapters.controlnet_common import ControlNetBase
from peft_hcp.adapters.controlnet_types import HcpControlNetConfig, HcpFluxControlNetConfig, HcpSD3ControlNetConfig
from peft_hcp.base.snapshot import all_or_nothing


_CONFIGS = {
    ControlNetModel: HcpControlNetConfig,
    SD3ControlNetModel: HcpSD3ControlNetConfig,
    FluxControlNetModel: HcpFluxControlNetConfig,
}


def controlnet_plugin(model: nn.Module, adapter_name: str = "default") -> ControlNetBase:
    """The ControlNet plugin block of ``adapter_name`` inside ``model`` (a PeftModel, or a host adapted in place)."""
    found = [m for m in model.modules() if isinstance(m, ControlNetBase) and m.adapter_name == adapter_name]
    if not found:
        names = sorted({m.adapter_name for m in model.modules() if isinstance(m, ControlNetBase)})
        raise ValueError(f"No ControlNet plugin named {adapter_name!r} in {type(model).__name__}; found {names}.")
    return found[0]


def export_controlnet(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> ModelMixin:
    """Save the plugin ``adapter_name`` of ``model`` as a diffusers ControlNet folder; return that model."""
    controlnet = controlnet_plugin(model, adapter_name).to_diffusers()
    controlnet.save_pretrained(folder, safe_serialization=True)
    return controlnet


def controlnet_config(controlnet: ModelMixin):
    """The plugin config of a diffusers ControlNet (its plugin fields; the layers default to the host's)."""
    config_cls = _CONFIGS.get(type(controlnet))
    if config_cls is None:
        raise TypeError(
            f"No ControlNet plugin for {type(controlnet).__name__}; supported: {', '.join(c.__name__ for c in _CONFIGS)}."
        )
    return config_cls(**config_cls.plugin_cls.config_values(dict(controlnet.config)))


def load_controlnet(model: nn.Module, controlnet: ModelMixin, adapter_name: str = "default") -> None:
    """Copy the weights of ``controlnet`` into the plugin ``adapter_name`` of ``model``; one that does not fit
    (its config, a weight's name or shape) is refused before any is copied."""
    plugin = controlnet_plugin(model, adapter_name)
    with all_or_nothing(model, values=plugin.state_dict().values()):
        plugin.load_diffusers(controlnet)


def import_controlnet(host: nn.Module, controlnet: ModelMixin, adapter_name: str = "default") -> PeftModel:
    """``host`` with ``controlnet`` attached as a trainable plugin adapter (its base weights frozen); refused,
    ``host`` left as it was, when ``controlnet`` was not made for it."""
    config = controlnet_config(controlnet)
    config.plugin_cls.check_fits(host, config, controlnet)
    with all_or_nothing(host):
        model = get_peft_model(host, config, adapter_name=adapter_name)
        load_controlnet(model, controlnet, adapter_name)
    return model
