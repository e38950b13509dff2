"""The ControlNet plugin types as PEFT registers them: configs, containers and tuners.

The model code (:mod:`.controlnet` for UNets, :mod:`.controlnet_dit` for SD3 and Flux, and the diffusers
ControlNets they build on) is imported when an adapter of the type is first attached or loaded, not by
``import peft_hcp``: each container names its plugin block as a :class:`~peft_hcp.registry.LazyClass`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_hcp.hooked import HcpHookedModel, HcpMultiPluginConfig, MultiPluginLayer
from peft_hcp.registry import LazyClass


#: the plugin blocks, imported on first use
UNET_PLUGIN = LazyClass("peft_hcp.adapters.controlnet", "ControlNetPlugin")
SD3_PLUGIN = LazyClass("peft_hcp.adapters.controlnet_dit", "SD3ControlNetPlugin")
FLUX_PLUGIN = LazyClass("peft_hcp.adapters.controlnet_dit", "FluxControlNetPlugin")


@dataclass
class HcpSD3ControlNetConfig(HcpMultiPluginConfig):
    """A ControlNet on an ``SD3Transformer2DModel`` (see :class:`~peft_hcp.adapters.controlnet_dit.SD3ControlNetPlugin`); fields as in ``SD3ControlNetModel``."""

    num_layers: int = field(default=12, metadata={"help": "How many of the host's first joint blocks to copy."})
    extra_conditioning_channels: int = field(
        default=0, metadata={"help": "Channels of the control latents beyond the host's latent channels."}
    )
    force_zeros_for_pooled_projection: bool = field(
        default=True,
        metadata={
            "help": "Give the copy zero pooled projections (diffusers' default; its pipeline then skips "
            "the VAE shift on the control latents)."
        },
    )


class HcpSD3ControlNetContainer(MultiPluginLayer, type_name="hcp_sd3_controlnet", block_cls=SD3_PLUGIN):
    """The container of ``hcp_sd3_controlnet``: one SD3 ControlNet per adapter."""


class HcpSD3ControlNetModel(HcpHookedModel, layer_cls=HcpSD3ControlNetContainer, config_cls=HcpSD3ControlNetConfig):
    """The PEFT tuner of ``hcp_sd3_controlnet``; defining it registers the type with PEFT."""


@dataclass
class HcpFluxControlNetConfig(HcpMultiPluginConfig):
    """A ControlNet on a ``FluxTransformer2DModel`` (see :class:`~peft_hcp.adapters.controlnet_dit.FluxControlNetPlugin`); fields as in ``FluxControlNetModel``."""

    num_layers: int = field(default=4, metadata={"help": "How many of the host's first double-stream blocks to copy."})
    num_single_layers: int = field(
        default=10, metadata={"help": "How many of the host's first single-stream blocks to copy."}
    )


class HcpFluxControlNetContainer(MultiPluginLayer, type_name="hcp_flux_controlnet", block_cls=FLUX_PLUGIN):
    """The container of ``hcp_flux_controlnet``: one Flux ControlNet per adapter."""


class HcpFluxControlNetModel(HcpHookedModel, layer_cls=HcpFluxControlNetContainer, config_cls=HcpFluxControlNetConfig):
    """The PEFT tuner of ``hcp_flux_controlnet``; defining it registers the type with PEFT."""


@dataclass
class HcpControlNetConfig(HcpMultiPluginConfig):
    """A ControlNet on a diffusers UNet, SD 1.x/2.x or SDXL (see :class:`~peft_hcp.adapters.controlnet.ControlNetPlugin`); default layers fit its layout."""

    conditioning_channels: int = field(default=3, metadata={"help": "Channels of the condition image."})
    conditioning_embedding_out_channels: list[int] = field(
        default_factory=lambda: [16, 32, 96, 256],
        metadata={"help": "Channels of the condition head; each step after the first halves the size."},
    )


class HcpControlNetContainer(MultiPluginLayer, type_name="hcp_controlnet", block_cls=UNET_PLUGIN):
    """The container of ``hcp_controlnet`` (``model.hcp_controlnet``): one ControlNet copy per adapter."""


class HcpControlNetModel(HcpHookedModel, layer_cls=HcpControlNetContainer, config_cls=HcpControlNetConfig):
    """The PEFT tuner of ``hcp_controlnet``; defining it registers the type with PEFT."""
