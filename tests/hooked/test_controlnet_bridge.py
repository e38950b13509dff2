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
    UNet2DConditionModel,
)
from transformers import CLIPTokenizer

import peft_hcp
from peft_hcp import HcpControlNetConfig
from peft_hcp.adapters.controlnet_bridge import (
    controlnet_config,
    export_controlnet,
    import_controlnet,
    load_controlnet,
)
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, tiny_vae, tokenizer_path, unet_inputs
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


# -- an LCM-distilled UNet: its time embedding also takes `timestep_cond`, which the ControlNet does not -----


def lcm_unet() -> UNet2DConditionModel:
    """The tiny UNet with an LCM guidance embedding (``time_cond_proj_dim``)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**tiny_unet().config, "time_cond_proj_dim": 8})


def lcm_call(seed: int = 3) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """The tiny UNet's inputs, a guidance embedding and a control image."""
    sample, t, text = unet_inputs()
    g = torch.Generator().manual_seed(seed)
    return (
        (sample, t, text),
        torch.randn(sample.shape[0], 8, generator=g),
        torch.rand(sample.shape[0], 3, 32, 32, generator=g),
    )


def stock_output(unet, controlnet, inputs: tuple, timestep_cond, cond) -> torch.Tensor:
    """What a stock diffusers ControlNet pipeline computes: the ControlNet's residuals (no ``timestep_cond``),
    added by the UNet (which takes it)."""
    sample, t, text = inputs
    with torch.no_grad():
        down, mid = controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        return unet(
            *inputs,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample


def plugin_output(model, inputs: tuple, timestep_cond, cond) -> torch.Tensor:
    with torch.no_grad(), peft_hcp.feed(model, cond=cond):
        return model(*inputs, timestep_cond=timestep_cond).sample


def test_a_stock_controlnet_on_an_lcm_unet_imports_computes_as_diffusers_and_exports_unchanged(tmp_path):
    controlnet = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=tuple(HEAD))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # random everywhere, the zero convolutions included
        for param in controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    host = lcm_unet()
    stock_unet = lcm_unet()
    inputs, timestep_cond, cond = lcm_call()
    model = import_controlnet(host, controlnet)
    expected = stock_output(stock_unet, controlnet, inputs, timestep_cond, cond)
    without = stock_unet(*inputs, timestep_cond=timestep_cond).sample.detach()
    assert (expected - without).abs().max() > 1e-2  # the residuals count
    torch.testing.assert_close(plugin_output(model, inputs, timestep_cond, cond), expected, rtol=0, atol=1e-6)

    export_controlnet(model, tmp_path / "lcm")
    exported = ControlNetModel.from_pretrained(tmp_path / "lcm").state_dict()
    assert exported.keys() == controlnet.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in controlnet.state_dict().items())


def test_a_plugin_trained_in_place_on_an_lcm_unet_exports_to_the_stock_controlnet(tmp_path):
    host = lcm_unet()
    host.add_adapter(HcpControlNetConfig(conditioning_embedding_out_channels=HEAD, init_weights=False), "edges")
    inputs, timestep_cond, cond = lcm_call()
    controlnet = export_controlnet(host, tmp_path / "edges", adapter_name="edges")
    assert "time_embedding.cond_proj.weight" not in controlnet.state_dict()
    stock = stock_output(lcm_unet(), ControlNetModel.from_pretrained(tmp_path / "edges"), inputs, timestep_cond, cond)
    torch.testing.assert_close(plugin_output(host, inputs, timestep_cond, cond), stock, rtol=0, atol=1e-6)

    other = lcm_unet()  # the documented in-place import: attach the ControlNet's config, then load it
    other.add_adapter(controlnet_config(controlnet), "edges")
    load_controlnet(other, controlnet, "edges")
    torch.testing.assert_close(plugin_output(other, inputs, timestep_cond, cond), stock, rtol=0, atol=1e-6)
