"""SD 1.x ControlNet plugin <-> diffusers: an exported plugin in a stock ``StableDiffusionControlNetPipeline``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from transformers import CLIPTokenizer

import peft_hcp
from peft_hcp import HcpControlNetConfig
from peft_hcp.adapters.controlnet_bridge import export_controlnet, import_controlnet
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, tiny_vae, tokenizer_path
from tests.helpers import assert_model_unchanged, model_snapshot


RESOLUTION = 32  # the tiny VAE halves it to the tiny UNet's 16x16 latents
HEAD = [8, 16]  # the condition head halves once: the control image has the pipeline's resolution


def components(unet) -> dict:
    return dict(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_path()),
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def image(pipe, **kw) -> np.ndarray:
    return pipe(
        "a red circle",
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


def test_an_exported_plugin_gives_the_same_image_in_the_stock_controlnet_pipeline(tmp_path):
    unet = tiny_unet()
    unet.add_adapter(
        HcpControlNetConfig(conditioning_embedding_out_channels=HEAD, init_weights=False), adapter_name="edges"
    )
    control_image = torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    plugin_pipe = StableDiffusionPipeline(**components(unet))
    with peft_hcp.feed(plugin_pipe, cond=control_image):  # classifier-free guidance: the one image is repeated
        with_plugin = image(plugin_pipe)
    without = image(StableDiffusionPipeline(**components(tiny_unet())))

    export_controlnet(unet, tmp_path / "edges", adapter_name="edges")
    stock = StableDiffusionControlNetPipeline(
        **components(tiny_unet()), controlnet=ControlNetModel.from_pretrained(tmp_path / "edges")
    )
    with_export = image(stock, image=control_image)
    print(
        f"SD1.x plugin pipeline vs stock ControlNet pipeline image: max diff {np.abs(with_export - with_plugin).max():.3g}"
    )
    assert np.abs(with_plugin - without).max() > 1e-3
    np.testing.assert_allclose(with_export, with_plugin, rtol=0, atol=1e-5)


def test_a_controlnet_of_another_unet_is_refused_and_the_host_left_as_it_was():
    other = tiny_unet()
    other_controlnet = ControlNetModel.from_unet(other, conditioning_embedding_out_channels=tuple(HEAD))
    other_controlnet.register_to_config(cross_attention_dim=64)  # as if made for a UNet with wider text embeddings
    host = tiny_unet()
    before = model_snapshot(host)
    with pytest.raises(ValueError, match="cross_attention_dim: ControlNet 64, plugin on this host 32"):
        import_controlnet(host, other_controlnet)
    assert_model_unchanged(before, host)
