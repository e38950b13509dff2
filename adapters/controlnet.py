"""A ControlNet as a many -> many plugin (HCP-Diffusion's ``ControlNetPlugin``), for any UNet2DConditionModel layout.

The plugin copies the host's encoder (``conv_in``, time embedding, down blocks, mid block) with its
weights, adds a condition-image head (diffusers' ``ControlNetConditioningEmbedding``) and one
zero-initialised 1x1 convolution per skip connection, and adds its residuals where diffusers' UNet adds
``down_block_additional_residuals`` / ``mid_block_additional_residual``. Hook indices (the default layers):

* from 0 ``prehook:`` (the UNet itself): remembers the call's ``timestep``, ``encoder_hidden_states``,
  ``timestep_cond``, ``attention_mask`` and ``cross_attention_kwargs``, given by position or keyword;
* from 1 ``prehook:conv_in``: runs the ControlNet on the UNet's sample, inside the UNet's call (so inside
  its autocast);
* to 0 .. n-1 ``down_blocks.i`` (``re:down_blocks\\.\\d+``): adds the block's residuals to its skip outputs;
* to n ``mid_block``: adds the mid residual to its output;
* to n+1 ``prehook:`` on the last resnet of the last up block: adds the ``conv_in`` residual to the skip
  half of its input (the channels that the UNet concatenated from ``conv_in``).

The condition image comes through the feeder: ``with peft_hcp.feed(model, cond=image): model(...)``. Its
spatial size is the latent size times ``2 ** (len(conditioning_embedding_out_channels) - 1)``; a batch
that divides the model's batch (classifier-free guidance) is repeated to fit. The adapter weight set by
diffusers' ``set_adapters`` scales the residuals (``controlnet_conditioning_scale``).
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_hcp.errors import SelectorMatchError, UnsupportedLayerError
from peft_hcp.hooked import (
    HcpHookedModel,
    HcpMultiPluginConfig,
    MultiPluginBlock,
    MultiPluginLayer,
)
from peft_hcp.registry import register_type
from peft_hcp.selectors import Target

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_CALL_ARGS = ("timestep", "encoder_hidden_states", "timestep_cond", "attention_mask", "cross_attention_kwargs")


def check_host(host: nn.Module) -> None:
    """Raise ``UnsupportedLayerError`` unless ``host`` has the UNet encoder a ControlNet copies."""
    down_blocks = getattr(host, "down_blocks", None)
    if not isinstance(down_blocks, nn.ModuleList) or len(down_blocks) == 0:
        raise UnsupportedLayerError(
            f"ControlNetPlugin copies its host's encoder, but {type(host).__name__} has no down blocks; "
            "attach it to a diffusers UNet2DConditionModel."
        )
    for name in ("conv_in", "time_proj", "time_embedding", "mid_block", "up_blocks"):
        if getattr(host, name, None) is None:
            raise UnsupportedLayerError(f"ControlNetPlugin needs the host's {name!r}; {type(host).__name__} has none.")
    for name in ("class_embedding", "add_embedding", "encoder_hid_proj"):
        if getattr(host, name, None) is not None:
            raise UnsupportedLayerError(f"ControlNetPlugin does not support hosts with a {name!r} (yet).")


def clean_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its forward hooks and with PEFT tuner layers unwrapped to their base."""
    saved = [(m, {attr: m.__dict__[attr] for attr in _HOOK_DICTS}) for m in module.modules()]
    for m, _ in saved:
        for attr in _HOOK_DICTS:
            m.__dict__[attr] = OrderedDict()
    try:
        clone = copy.deepcopy(module)
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)
    if isinstance(clone, BaseTunerLayer):
        return clone.get_base_layer()
    done: list[str] = []
    for name, sub in list(clone.named_modules()):
        if name and isinstance(sub, BaseTunerLayer) and not any(name.startswith(d + ".") for d in done):
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent), attr, sub.get_base_layer())
            done.append(name)
    return clone


def _skip_channels(block: nn.Module) -> list[int]:
    """Channels of the skip outputs a diffusers down block returns, in order."""
    channels = [resnet.out_channels for resnet in block.resnets]
    if getattr(block, "downsamplers", None) is not None:
        channels += [sampler.out_channels for sampler in block.downsamplers]
    return channels


def _zero_conv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1)


class ControlNetPlugin(MultiPluginBlock):
    """ControlNet residuals computed from a copy of the host encoder; see the module docstring."""

    input_keys = ("cond",)

    @classmethod
    def default_layers(cls, host: nn.Module) -> tuple[list[str], list[str]]:
        check_host(host)
        last_up = len(host.up_blocks) - 1
        last_resnet = len(host.up_blocks[last_up].resnets) - 1
        return (
            ["prehook:", "prehook:conv_in"],
            [r"re:down_blocks\.\d+", "mid_block", f"prehook:up_blocks.{last_up}.resnets.{last_resnet}"],
        )

    def __init__(
        self, from_layers: list[Target], to_layers: list[Target], host: nn.Module, config: "HcpControlNetConfig"
    ) -> None:
        super().__init__(from_layers, to_layers, host, config)
        check_host(host)
        self.n_down = len(host.down_blocks)
        if len(from_layers) != 2 or len(to_layers) != self.n_down + 2:
            raise SelectorMatchError(
                f"ControlNetPlugin on a UNet with {self.n_down} down blocks needs 2 from-layers (the UNet call, "
                f"conv_in) and {self.n_down + 2} to-layers (each down block, the mid block, the last up resnet); "
                f"got from {self.from_names} and to {self.to_names}."
            )
        self._arg_names = [p for p in inspect.signature(host.forward).parameters]
        self.conv_in = clean_copy(host.conv_in)
        self.time_proj = clean_copy(host.time_proj)
        self.time_embedding = clean_copy(host.time_embedding)
        self.down_blocks = clean_copy(host.down_blocks)
        self.mid_block = clean_copy(host.mid_block)
        stem = self.conv_in.out_channels
        cond_channels = tuple(config.conditioning_embedding_out_channels)
        self.cond_scale = 2 ** (len(cond_channels) - 1)
        self.cond_embedding = ControlNetConditioningEmbedding(
            stem, conditioning_channels=config.conditioning_channels, block_out_channels=cond_channels
        )
        self.zero_conv_in = _zero_conv(stem)
        self.zero_convs_down = nn.ModuleList(
            nn.ModuleList(_zero_conv(c) for c in _skip_channels(block)) for block in self.down_blocks
        )
        self.zero_conv_mid = _zero_conv(self.mid_block.resnets[-1].out_channels)
        zero_init = [self.zero_conv_in, self.zero_conv_mid, *self.zero_convs_down, self.cond_embedding.conv_out]
        for module in zero_init:
            for param in module.parameters():
                nn.init.zeros_(param) if config.init_weights else nn.init.normal_(param, std=0.02)

    def residuals(self, sample: torch.Tensor, call: dict, cond: torch.Tensor):
        """``(conv_in residual, [per down block: tuple of residuals], mid residual)`` for one UNet call."""
        dtype = self.conv_in.weight.dtype
        batch = sample.shape[0]
        if cond.shape[0] != batch:
            if batch % cond.shape[0]:
                raise ValueError(f"The fed 'cond' has batch {cond.shape[0]}, which does not divide the UNet's batch {batch}.")
            cond = cond.repeat(batch // cond.shape[0], *([1] * (cond.ndim - 1)))
        expected = tuple(s * self.cond_scale for s in sample.shape[-2:])
        if tuple(cond.shape[-2:]) != expected:
            raise ValueError(f"The fed 'cond' is {tuple(cond.shape[-2:])} pixels; this UNet call needs {expected}.")
        timesteps = call["timestep"]
        if not torch.is_tensor(timesteps):
            kind = torch.float64 if isinstance(timesteps, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=kind, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        emb = self.time_embedding(self.time_proj(timesteps.expand(batch)).to(dtype), call.get("timestep_cond"))
        context = call.get("encoder_hidden_states")
        context = context.to(dtype) if context is not None else None
        mask = call.get("attention_mask")
        if mask is not None:  # as UNet2DConditionModel.forward prepares it
            mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
        cross = dict(encoder_hidden_states=context, attention_mask=mask, cross_attention_kwargs=call.get("cross_attention_kwargs"))
        hidden = self.conv_in(sample.to(dtype)) + self.cond_embedding(cond.to(dtype))
        stem = self.zero_conv_in(hidden) * self.scaling
        down = []
        for block, convs in zip(self.down_blocks, self.zero_convs_down):
            if getattr(block, "has_cross_attention", False):
                hidden, skips = block(hidden_states=hidden, temb=emb, **cross)
            else:
                hidden, skips = block(hidden_states=hidden, temb=emb)
            down.append(tuple(conv(skip) * self.scaling for conv, skip in zip(convs, skips)))
        if getattr(self.mid_block, "has_cross_attention", False):
            hidden = self.mid_block(hidden, emb, **cross)
        else:
            hidden = self.mid_block(hidden, emb)
        return stem, down, self.zero_conv_mid(hidden) * self.scaling

    def from_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> None:
        if idx == 0:
            call = dict(zip(self._arg_names, args), **kwargs)
            self.cache["call"] = {key: call.get(key) for key in _CALL_ARGS}
            return
        if "call" not in self.cache:
            raise RuntimeError(f"ControlNetPlugin: from-layer {self.from_names[0]!r} (the UNet call) did not run first.")
        sample = args[0] if args else kwargs["input"]
        self.cache["res"] = self.residuals(sample, self.cache["call"], self.require_input("cond"))

    def to_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> Any:
        stem, down, mid = self.cache["res"]
        if idx < self.n_down:
            hidden, skips = output
            if len(skips) != len(down[idx]):
                raise RuntimeError(
                    f"ControlNetPlugin: {self.to_names[idx]!r} returned {len(skips)} skip outputs, the copy {len(down[idx])}."
                )
            return hidden, tuple(s + r.to(s.dtype) for s, r in zip(skips, down[idx]))
        if idx == self.n_down:
            return output + mid.to(output.dtype)
        x = args[0] if args else kwargs["input_tensor"]
        width = stem.shape[1]
        x = torch.cat([x[:, :-width], x[:, -width:] + stem.to(x.dtype)], dim=1)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "input_tensor": x}


class HcpControlNetContainer(MultiPluginLayer, type_name="hcp_controlnet", block_cls=ControlNetPlugin):
    """The container of ``hcp_controlnet`` (``model.hcp_controlnet``): one ControlNet copy per adapter."""


class HcpControlNetModel(HcpHookedModel, layer_cls=HcpControlNetContainer):
    """The PEFT tuner of ``hcp_controlnet``."""


@register_type(HcpControlNetModel)
@dataclass
class HcpControlNetConfig(HcpMultiPluginConfig):
    """A ControlNet on a diffusers UNet (see :class:`ControlNetPlugin`); default layers fit any UNet layout."""

    conditioning_channels: int = field(default=3, metadata={"help": "Channels of the condition image."})
    conditioning_embedding_out_channels: list[int] = field(
        default_factory=lambda: [16, 32, 96, 256],
        metadata={"help": "Channels of the condition head; each step after the first halves the size."},
    )
