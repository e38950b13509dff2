"""A ControlNet on a diffusers UNet (SD 1.x / 2.x, SDXL) as a many -> many plugin (HCP-Diffusion's ``ControlNetPlugin``).

The plugin copies the host's encoder (``conv_in``, time embedding, SDXL's ``text_time`` added embedding,
down blocks, mid block) with its weights, adds a condition-image head (diffusers'
``ControlNetConditioningEmbedding``) and one zero-initialised 1x1 convolution per skip connection, and
adds its residuals where diffusers' UNet adds ``down_block_additional_residuals`` /
``mid_block_additional_residual`` — the math of diffusers' ``ControlNetModel``, which it exports to and
imports from (:mod:`.controlnet_bridge`). Hosts: ``UNet2DConditionModel`` without a class embedding, an
``encoder_hid_proj`` or a time-embedding activation, and with no added embedding or SDXL's
``text_time`` one; anything else is refused before the model is touched. Hook indices (the default layers):

* from 0 ``prehook:`` (the UNet itself): remembers the call's ``timestep``, ``encoder_hidden_states``,
  ``attention_mask``, ``cross_attention_kwargs`` and ``added_cond_kwargs`` (SDXL's ``text_embeds`` and
  ``time_ids``), given by position or keyword. An LCM-distilled UNet's ``timestep_cond`` is the UNet's own, as
  with diffusers' ``ControlNetModel``: the copied time embedding has no guidance projection;
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

from typing import TYPE_CHECKING, Any, Optional

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from peft_hcp.adapters.controlnet_common import ControlNetBase, clean_copy
from peft_hcp.errors import SelectorMatchError, UnsupportedLayerError
from peft_hcp.selectors import Target


if TYPE_CHECKING:
    from peft_hcp.adapters.controlnet_types import HcpControlNetConfig


#: UNet config entries a ``ControlNetModel`` takes over from its UNet (as ``ControlNetModel.from_unet`` does).
_SHARED_CONFIG = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
    "mid_block_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def _skip_channels(block: nn.Module) -> list[int]:
    """Channels of the skip outputs a diffusers down block returns, in order."""
    channels = [resnet.out_channels for resnet in block.resnets]
    if getattr(block, "downsamplers", None) is not None:
        channels += [sampler.out_channels for sampler in block.downsamplers]
    return channels


def _zero_conv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1)


class ControlNetPlugin(ControlNetBase):
    """ControlNet residuals computed from a copy of the host encoder; see the module docstring."""

    call_keys = (
        "timestep",
        "encoder_hidden_states",
        "attention_mask",
        "cross_attention_kwargs",
        "added_cond_kwargs",
    )
    diffusers_class = ControlNetModel
    plugin_fields = ("conditioning_channels", "conditioning_embedding_out_channels")

    @classmethod
    def check_host(cls, host: nn.Module, config: Any) -> None:
        kind = type(host).__name__
        down_blocks = getattr(host, "down_blocks", None)
        if not isinstance(down_blocks, nn.ModuleList) or len(down_blocks) == 0:
            raise UnsupportedLayerError(
                f"ControlNetPlugin copies a UNet2DConditionModel's encoder, but {kind} has no down blocks "
                "('down_blocks'); for SD3 use HcpSD3ControlNetConfig, for Flux HcpFluxControlNetConfig."
            )
        for name in ("conv_in", "time_proj", "time_embedding", "mid_block", "up_blocks", "config"):
            if getattr(host, name, None) is None:
                raise UnsupportedLayerError(f"ControlNetPlugin needs the host's {name!r}; {kind} has none.")
        for name in ("class_embedding", "encoder_hid_proj", "time_embed_act"):
            if getattr(host, name, None) is not None:
                raise UnsupportedLayerError(
                    f"ControlNetPlugin does not support a {kind} with a {name!r} (diffusers' ControlNetModel "
                    "does not compute it either)."
                )
        added = host.config.get("addition_embed_type")
        if added not in (None, "text_time"):
            raise UnsupportedLayerError(
                f"ControlNetPlugin supports no added embedding or SDXL's 'text_time'; this {kind} has "
                f"addition_embed_type={added!r}."
            )

    @classmethod
    def diffusers_config(cls, host_config: dict, config: Any) -> dict:
        shared = {key: host_config[key] for key in _SHARED_CONFIG if key in host_config}
        return {
            **shared,
            "conditioning_channels": config.conditioning_channels,
            "conditioning_embedding_out_channels": list(config.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": False,
        }

    @classmethod
    def default_layers(cls, host: nn.Module) -> tuple[list[str], list[str]]:
        last_up = len(host.up_blocks) - 1
        last_resnet = len(host.up_blocks[last_up].resnets) - 1
        return (
            ["prehook:", "prehook:conv_in"],
            [r"re:down_blocks\.\d+", "mid_block", f"prehook:up_blocks.{last_up}.resnets.{last_resnet}"],
        )

    def __init__(
        self, from_layers: list[Target], to_layers: list[Target], host: nn.Module, config: HcpControlNetConfig
    ) -> None:
        super().__init__(from_layers, to_layers, host, config)
        self.n_down = len(host.down_blocks)
        if len(from_layers) != 2 or len(to_layers) != self.n_down + 2:
            raise SelectorMatchError(
                f"ControlNetPlugin on a UNet with {self.n_down} down blocks needs 2 from-layers (the UNet call, "
                f"conv_in) and {self.n_down + 2} to-layers (each down block, the mid block, the last up resnet); "
                f"got from {self.from_names} and to {self.to_names}."
            )
        self.conv_in = clean_copy(host.conv_in)
        self.time_proj = clean_copy(host.time_proj)
        self.time_embedding = clean_copy(host.time_embedding)
        # an LCM-distilled UNet's guidance embedding (`time_cond_proj_dim`) is the UNet's alone: diffusers'
        # ControlNetModel has none, and its pipelines give the ControlNet no `timestep_cond`
        self.time_embedding.cond_proj = None
        has_added = getattr(host, "add_embedding", None) is not None
        self.add_time_proj = clean_copy(host.add_time_proj) if has_added else None
        self.add_embedding = clean_copy(host.add_embedding) if has_added else None
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
        self.init_zero(
            [self.zero_conv_in, self.zero_conv_mid, *self.zero_convs_down, self.cond_embedding.conv_out],
            config.init_weights,
        )
        self.to(self.conv_in.weight.dtype)

    def diffusers_key(self, key: str) -> str:
        head, _, rest = key.partition(".")
        if head == "cond_embedding":
            return f"controlnet_cond_embedding.{rest}"
        if head == "zero_conv_in":
            return f"controlnet_down_blocks.0.{rest}"
        if head == "zero_conv_mid":
            return f"controlnet_mid_block.{rest}"
        if head == "zero_convs_down":  # nested per block here, one flat list after the stem's in diffusers
            block, index, rest = rest.split(".", 2)
            before = sum(len(convs) for convs in self.zero_convs_down[: int(block)])
            return f"controlnet_down_blocks.{1 + before + int(index)}.{rest}"
        return key

    def _embedding(self, timesteps: Any, call: dict, batch: int, device: torch.device) -> torch.Tensor:
        """The time embedding, plus SDXL's ``text_time`` embedding of ``text_embeds`` and ``time_ids``."""
        dtype = self.dtype
        if not torch.is_tensor(timesteps):
            kind = torch.float64 if isinstance(timesteps, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=kind, device=device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(device)
        emb = self.time_embedding(self.time_proj(timesteps.expand(batch)).to(dtype))
        if self.add_embedding is None:
            return emb
        added = call.get("added_cond_kwargs") or {}
        missing = [key for key in ("text_embeds", "time_ids") if key not in added]
        if missing:
            raise ValueError(f"ControlNetPlugin on an SDXL UNet needs added_cond_kwargs {missing} in the UNet call.")
        text_embeds = added["text_embeds"]
        time_embeds = self.add_time_proj(added["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
        return emb + self.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

    def residuals(self, sample: torch.Tensor, call: dict, cond: torch.Tensor):
        """``(conv_in residual, [per down block: tuple of residuals], mid residual)`` for one UNet call."""
        dtype = self.dtype
        emb = self._embedding(call["timestep"], call, sample.shape[0], sample.device)
        context = call.get("encoder_hidden_states")
        context = context.to(dtype) if context is not None else None
        mask = call.get("attention_mask")
        if mask is not None:  # as UNet2DConditionModel.forward prepares it
            mask = ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
        cross = dict(
            encoder_hidden_states=context,
            attention_mask=mask,
            cross_attention_kwargs=call.get("cross_attention_kwargs"),
        )
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
            self.remember_call(args, kwargs)
            return
        call = self.recorded_call()
        sample = args[0] if args else kwargs["input"]
        expected = tuple(s * self.cond_scale for s in sample.shape[-2:])
        cond = self.condition(
            sample.shape[0],
            lambda c: (
                None
                if tuple(c.shape[-2:]) == expected
                else f"is {tuple(c.shape[-2:])} pixels; this UNet call needs {expected}"
            ),
        )
        self.cache["res"] = self.residuals(sample, call, cond)

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
