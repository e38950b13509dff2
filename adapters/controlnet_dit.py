"""ControlNets for diffusion transformers (SD3's MMDiT, Flux) as many -> many plugins.

As diffusers' ``SD3ControlNetModel`` / ``FluxControlNetModel`` do it: the plugin copies the host's input
embedders and its first ``num_layers`` transformer blocks (Flux: also the first ``num_single_layers``
single-stream blocks) with their weights, adds the control image — VAE latents (``(B, C, H, W)`` for SD3;
packed ``(B, tokens, C)`` for Flux, as ``FluxControlNetPipeline`` packs them) — through a zero-initialised
embedder to the copy's image tokens, and adds each copied block's image tokens, through a zero-initialised
``Linear``, to the image tokens a host block returns. Which output reaches which host block follows the
diffusers transformers: SD3 block ``i`` of ``n`` gets output ``int(i / (n / N))`` (a context-pre-only last
block gets none); Flux double block ``i`` gets ``i // ceil(n / N)``, single blocks likewise. The plugins
export to and import from those diffusers classes (:mod:`.controlnet_bridge`); their module names are the
diffusers ones. Hook indices (the default layers):

* from 0 ``prehook:`` (the transformer): remembers the call's timestep, text embeddings, pooled
  projections (Flux: also ``guidance``, ``img_ids``, ``txt_ids``);
* from 1 ``prehook:pos_embed`` (SD3) / ``prehook:x_embedder`` (Flux): runs the copy on the latents the
  host embeds, inside the host's call (and its autocast);
* to 0 ..: the host blocks that take a control output (``transformer_blocks.i``; Flux also
  ``single_transformer_blocks.j``), in model order. Any subset of them may be selected.

The condition comes through the feeder (``with peft_hcp.feed(model, cond=latents):``); a batch that divides
the model's batch is repeated. The adapter weight (``set_adapters``) is the conditioning scale. As in
diffusers' ControlNets, ``joint_attention_kwargs`` reach the host's blocks only, and a host block skipped
with SD3's ``skip_layers`` gets no control output here (diffusers adds it anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from peft_hcp.adapters.controlnet_common import ControlNetBase, clean_copy
from peft_hcp.base.unwrap import base_module
from peft_hcp.errors import SelectorMatchError, UnsupportedLayerError
from peft_hcp.selectors import Target


@dataclass(frozen=True)
class BlockGroup:
    """Host transformer blocks of one kind, the first of which the ControlNet copies."""

    attr: str  # the host's (and the copy's) ModuleList, e.g. "transformer_blocks"
    count: str  # the config field saying how many are copied, e.g. "num_layers"
    outputs: str  # the copy's zero-initialised Linear per copied block, e.g. "controlnet_blocks"
    block_type: type


class DiTControlNetPlugin(ControlNetBase):
    """What the SD3 and Flux ControlNet plugins share; see the module docstring."""

    groups: ClassVar[tuple[BlockGroup, ...]]
    copied: ClassVar[tuple[str, ...]]  # host embedders copied with their weights
    latent_embedder: ClassVar[str]  # the host module whose input is the latents
    #: the host config fields the diffusers ControlNet's config repeats
    host_fields: ClassVar[tuple[str, ...]] = (
        "patch_size",
        "in_channels",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "pooled_projection_dim",
    )

    @classmethod
    def check_host(cls, host: nn.Module, config: Any) -> None:
        kind = type(host).__name__
        if getattr(host, "config", None) is None:
            raise UnsupportedLayerError(
                f"{cls.__name__} copies a diffusers transformer; {kind} has no diffusers config."
            )
        for group in cls.groups:
            blocks = getattr(host, group.attr, None)
            if not isinstance(blocks, nn.ModuleList) or not all(isinstance(b, group.block_type) for b in blocks):
                found = sorted({type(b).__name__ for b in blocks}) if isinstance(blocks, nn.ModuleList) else "none"
                raise UnsupportedLayerError(
                    f"{cls.__name__} copies the {group.block_type.__name__}s of '{group.attr}'; {kind} has {found} there."
                )
            wanted = getattr(config, group.count)
            if not 0 <= wanted <= len(blocks):
                raise UnsupportedLayerError(
                    f"{cls.__name__}: {group.count}={wanted}, but {kind} has {len(blocks)} blocks in '{group.attr}'."
                )
        if sum(getattr(config, group.count) for group in cls.groups) == 0:
            raise UnsupportedLayerError(
                f"{cls.__name__}: copy at least one block ({', '.join(g.count for g in cls.groups)})."
            )
        for name in (*cls.copied, cls.latent_embedder):
            if getattr(host, name, None) is None:
                raise UnsupportedLayerError(f"{cls.__name__} needs the host's {name!r}; {kind} has none.")

    @classmethod
    def diffusers_config(cls, host_config: dict, config: Any) -> dict:
        return {key: host_config[key] for key in cls.host_fields}

    @classmethod
    def default_layers(cls, host: nn.Module) -> tuple[list[str], list[str]]:
        to_layers = [
            f"{group.attr}.{i}"
            for group in cls.groups
            for i, block in enumerate(getattr(host, group.attr))
            if cls.takes_output(block)
        ]
        return ["prehook:", f"prehook:{cls.latent_embedder}"], to_layers

    @staticmethod
    def takes_output(block: nn.Module) -> bool:
        """Whether the host adds a control output after ``block``."""
        return True

    @staticmethod
    def output_index(block_index: int, n_blocks: int, n_outputs: int) -> int:
        """Which control output the host adds after its block ``block_index`` of ``n_blocks``."""
        raise NotImplementedError

    def __init__(self, from_layers: list[Target], to_layers: list[Target], host: nn.Module, config: Any) -> None:
        super().__init__(from_layers, to_layers, host, config)
        if len(from_layers) != 2:
            raise SelectorMatchError(
                f"{type(self).__name__} needs 2 from-layers (the transformer call, its {self.latent_embedder!r}); "
                f"got {self.from_names}."
            )
        inner = host.config.num_attention_heads * host.config.attention_head_dim
        for name in self.copied:
            setattr(self, name, clean_copy(getattr(host, name)))
        for group in self.groups:
            count = getattr(config, group.count)
            setattr(self, group.attr, clean_copy(nn.ModuleList(list(getattr(host, group.attr))[:count])))
            setattr(self, group.outputs, nn.ModuleList(nn.Linear(inner, inner) for _ in range(count)))
        cond_embedder = self.build_cond_embedder(host, config, inner)
        self.init_zero([cond_embedder, *(getattr(self, group.outputs) for group in self.groups)], config.init_weights)
        self._slots = [self._slot(target, host) for target in to_layers]
        self.to(next(getattr(self, self.copied[0]).parameters()).dtype)

    def build_cond_embedder(self, host: nn.Module, config: Any, inner: int) -> nn.Module:
        """Make (and set) the embedder of the control latents; it is zero-initialised."""
        raise NotImplementedError

    def cond_shape(self, latents: torch.Tensor) -> tuple[int, ...]:
        """The shape of one item of the control latents that fits ``latents``."""
        raise NotImplementedError

    def embed(self, latents: torch.Tensor, call: dict, cond: torch.Tensor) -> tuple:
        """``(image tokens, text tokens, temb, extra block kwargs)`` at the input of the copied blocks."""
        raise NotImplementedError

    def _slot(self, target: Target, host: nn.Module) -> Optional[tuple[int, int]]:
        """``(group, output index)`` added after the to-layer ``target``; ``None`` where nothing was copied."""
        module = base_module(target.module)
        for index, group in enumerate(self.groups):
            blocks = list(getattr(host, group.attr))
            if any(module is block for block in blocks):
                if target.prehook or not self.takes_output(module):
                    raise UnsupportedLayerError(
                        f"{type(self).__name__}: to-layer {target.name!r} cannot take"
                        " a control output (a 'prehook:', or a block the host adds none after)."
                    )
                n_outputs = len(getattr(self, group.outputs))
                if n_outputs == 0:
                    return None
                position = next(i for i, block in enumerate(blocks) if block is module)
                return index, self.output_index(position, len(blocks), n_outputs)
        raise UnsupportedLayerError(
            f"{type(self).__name__}: to-layer {target.name!r} is not a block of the host's "
            f"{' / '.join(g.attr for g in self.groups)}; control outputs go to those blocks."
        )

    def residuals(self, latents: torch.Tensor, call: dict, cond: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per block group, the scaled control output of each copied block."""
        dtype = self.dtype
        hidden, context, temb, extra = self.embed(latents.to(dtype), call, cond.to(dtype))
        result = []
        for group in self.groups:
            outputs = []
            for block, linear in zip(getattr(self, group.attr), getattr(self, group.outputs)):
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, **extra)
                outputs.append(linear(hidden) * self.scaling)
            result.append(outputs)
        return result

    def from_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> None:
        if idx == 0:
            self.remember_call(args, kwargs)
            return
        call = self.recorded_call()
        latents = args[0] if args else next(iter(kwargs.values()))  # the embedder's only input
        expected = self.cond_shape(latents)
        cond = self.condition(
            latents.shape[0],
            lambda c: (
                None
                if tuple(c.shape[1:]) == expected
                else f"has items of shape {tuple(c.shape[1:])}; this call needs {expected}"
            ),
        )
        self.cache["res"] = self.residuals(latents, call, cond)

    def to_layer_hook(self, idx: int, args: tuple, kwargs: dict, output: Optional[Any]) -> Any:
        slot = self._slots[idx]
        if slot is None:
            return None
        context, hidden = output
        residual = self.cache["res"][slot[0]][slot[1]]
        return context, hidden + residual.to(hidden.dtype)


class SD3ControlNetPlugin(DiTControlNetPlugin):
    """diffusers' ``SD3ControlNetModel`` on an ``SD3Transformer2DModel`` (see the module docstring)."""

    groups = (BlockGroup("transformer_blocks", "num_layers", "controlnet_blocks", JointTransformerBlock),)
    copied = ("pos_embed", "time_text_embed", "context_embedder")
    latent_embedder = "pos_embed"
    call_keys = ("timestep", "encoder_hidden_states", "pooled_projections")
    diffusers_class = SD3ControlNetModel
    plugin_fields = ("num_layers", "extra_conditioning_channels", "force_zeros_for_pooled_projection")
    host_fields = (
        *DiTControlNetPlugin.host_fields,
        "sample_size",
        "caption_projection_dim",
        "out_channels",
        "pos_embed_max_size",
        "qk_norm",
    )

    @classmethod
    def check_host(cls, host: nn.Module, config: Any) -> None:
        super().check_host(host, config)
        if not isinstance(host.pos_embed, PatchEmbed):
            raise UnsupportedLayerError(
                f"SD3ControlNetPlugin copies an SD3 patch embedder; {type(host).__name__}.pos_embed is "
                f"{type(host.pos_embed).__name__}, not PatchEmbed."
            )
        pre_only = [i for i in range(config.num_layers) if host.transformer_blocks[i].context_pre_only]
        if pre_only:
            raise UnsupportedLayerError(
                f"SD3ControlNetPlugin: transformer_blocks {pre_only} of {type(host).__name__} are context-pre-only "
                "(the last block); SD3 ControlNets copy only full joint blocks: lower num_layers."
            )

    @classmethod
    def diffusers_config(cls, host_config: dict, config: Any) -> dict:
        return {
            **super().diffusers_config(host_config, config),
            "dual_attention_layers": [i for i in host_config.get("dual_attention_layers", ()) if i < config.num_layers],
            "num_layers": config.num_layers,
            "extra_conditioning_channels": config.extra_conditioning_channels,
            "force_zeros_for_pooled_projection": config.force_zeros_for_pooled_projection,
            "pos_embed_type": "sincos",
            "use_pos_embed": True,
        }

    @staticmethod
    def takes_output(block: nn.Module) -> bool:
        return block.context_pre_only is False

    @staticmethod
    def output_index(block_index: int, n_blocks: int, n_outputs: int) -> int:
        return int(block_index / (n_blocks / n_outputs))

    def build_cond_embedder(self, host: nn.Module, config: Any, inner: int) -> nn.Module:
        self.force_zeros_for_pooled_projection = config.force_zeros_for_pooled_projection
        self.cond_channels = host.config.in_channels + config.extra_conditioning_channels
        self.pos_embed_input = PatchEmbed(
            height=host.config.sample_size,
            width=host.config.sample_size,
            patch_size=host.config.patch_size,
            in_channels=self.cond_channels,
            embed_dim=inner,
            pos_embed_type=None,
        )
        return self.pos_embed_input

    def cond_shape(self, latents: torch.Tensor) -> tuple[int, ...]:
        return (self.cond_channels, *latents.shape[-2:])

    def embed(self, latents: torch.Tensor, call: dict, cond: torch.Tensor) -> tuple:
        pooled = call["pooled_projections"]
        if self.force_zeros_for_pooled_projection:  # as StableDiffusion3ControlNetPipeline feeds such ControlNets
            pooled = torch.zeros_like(pooled)
        hidden = self.pos_embed(latents) + self.pos_embed_input(cond)
        temb = self.time_text_embed(call["timestep"], pooled.to(self.dtype))
        context = self.context_embedder(call["encoder_hidden_states"].to(self.dtype))
        return hidden, context, temb, {}


class FluxControlNetPlugin(DiTControlNetPlugin):
    """diffusers' ``FluxControlNetModel`` (latent condition, no union modes) on a ``FluxTransformer2DModel``."""

    groups = (
        BlockGroup("transformer_blocks", "num_layers", "controlnet_blocks", FluxTransformerBlock),
        BlockGroup(
            "single_transformer_blocks", "num_single_layers", "controlnet_single_blocks", FluxSingleTransformerBlock
        ),
    )
    copied = ("time_text_embed", "context_embedder", "x_embedder", "pos_embed")
    latent_embedder = "x_embedder"
    call_keys = ("timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance")
    diffusers_class = FluxControlNetModel
    plugin_fields = ("num_layers", "num_single_layers")
    host_fields = (*DiTControlNetPlugin.host_fields, "guidance_embeds", "axes_dims_rope")

    @classmethod
    def diffusers_config(cls, host_config: dict, config: Any) -> dict:
        return {
            **super().diffusers_config(host_config, config),
            "num_layers": config.num_layers,
            "num_single_layers": config.num_single_layers,
            "num_mode": None,
            "conditioning_embedding_channels": None,
        }

    @staticmethod
    def output_index(block_index: int, n_blocks: int, n_outputs: int) -> int:
        return block_index // math.ceil(n_blocks / n_outputs)

    def build_cond_embedder(self, host: nn.Module, config: Any, inner: int) -> nn.Module:
        self.controlnet_x_embedder = nn.Linear(host.config.in_channels, inner)
        return self.controlnet_x_embedder

    def cond_shape(self, latents: torch.Tensor) -> tuple[int, ...]:
        return tuple(latents.shape[1:])

    def embed(self, latents: torch.Tensor, call: dict, cond: torch.Tensor) -> tuple:
        hidden = self.x_embedder(latents) + self.controlnet_x_embedder(cond)
        timestep = call["timestep"].to(hidden.dtype) * 1000
        pooled = call["pooled_projections"].to(hidden.dtype)
        guidance = call.get("guidance")
        if guidance is None:
            temb = self.time_text_embed(timestep, pooled)
        else:
            temb = self.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        context = self.context_embedder(call["encoder_hidden_states"].to(hidden.dtype))
        txt_ids, img_ids = (ids[0] if ids.ndim == 3 else ids for ids in (call["txt_ids"], call["img_ids"]))
        rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return hidden, context, temb, {"image_rotary_emb": rotary}
