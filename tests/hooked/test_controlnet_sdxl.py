"""The ControlNet plugin on an SDXL-shaped UNet (``text_time`` added embedding), against diffusers' ``ControlNetModel``."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

import peft_hcp
from peft_hcp import HcpControlNetConfig, UnsupportedLayerError
from peft_hcp.adapters.controlnet_bridge import export_controlnet, import_controlnet
from peft_hcp.embedded import tiny_clip_text_model, tiny_vae, tokenizer_path
from peft_hcp.embedded.models import SDXL_TEXT_EMBEDS, sdxl_inputs, tiny_clip_text_config, tiny_sdxl_unet
from tests.controlnet_hosts import control, fed_output, train
from tests.helpers import assert_model_unchanged, model_snapshot, run_python


HEAD = [8, 16]  # condition head: the image is twice the latent size


def sdxl_config(**kw) -> HcpControlNetConfig:
    return HcpControlNetConfig(**{"conditioning_embedding_out_channels": HEAD, **kw})


def diffusers_output(unet: UNet2DConditionModel, controlnet: ControlNetModel, inputs: dict, cond: torch.Tensor):
    """The UNet's prediction with ``controlnet``'s residuals, as the SDXL ControlNet pipeline computes it."""
    with torch.no_grad():
        down, mid = controlnet(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            controlnet_cond=cond,
            added_cond_kwargs=inputs["added_cond_kwargs"],
            return_dict=False,
        )
        return unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


def test_copies_the_text_time_embedding_and_starts_as_a_no_op():
    unet = tiny_sdxl_unet()
    with torch.no_grad():
        base = unet(**sdxl_inputs()).sample
    model = get_peft_model(unet, sdxl_config())
    plugin = unet.hcp_controlnet.blocks["default"]
    for name, tensor in unet.add_embedding.state_dict().items():
        assert torch.equal(plugin.add_embedding.state_dict()[name], tensor)
    assert plugin.add_time_proj is not None
    assert torch.equal(fed_output(model, sdxl_inputs(), control("sdxl")), base)


def test_exports_to_a_controlnet_model_that_diffusers_loads_and_matches(tmp_path):
    unet = tiny_sdxl_unet()
    bare = copy.deepcopy(unet)
    model = get_peft_model(unet, sdxl_config(init_weights=False))
    inputs, cond = sdxl_inputs(), control("sdxl")
    expected = fed_output(model, inputs, cond)
    export_controlnet(model, tmp_path / "cn")
    assert sorted(os.listdir(tmp_path / "cn")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    controlnet = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert controlnet.config.addition_embed_type == "text_time"
    got = diffusers_output(bare, controlnet, inputs, cond)
    print(f"SDXL plugin vs exported ControlNetModel: max diff {(got - expected).abs().max().item():.3g}")
    assert not torch.allclose(expected, bare(**inputs).sample.detach(), atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def sdxl_components(unet: UNet2DConditionModel) -> dict:
    """Tiny SDXL pipeline parts: two CLIP encoders of width 32 (the UNet's 64 = both), the second projecting."""
    torch.manual_seed(0)
    second = CLIPTextModelWithProjection(tiny_clip_text_config(32, projection_dim=SDXL_TEXT_EMBEDS)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path())
    return dict(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(),
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        add_watermarker=False,
    )


def sdxl_image(pipe, **kw):
    return pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


def test_an_exported_plugin_gives_the_same_image_in_the_stock_sdxl_controlnet_pipeline(tmp_path):
    unet = tiny_sdxl_unet()
    model = get_peft_model(unet, sdxl_config(init_weights=False))
    control_image = control("sdxl", batch=1)  # the pipeline's 32x32 resolution
    plugin_pipe = StableDiffusionXLPipeline(**sdxl_components(unet))
    with peft_hcp.feed(plugin_pipe, cond=control_image):
        with_plugin = sdxl_image(plugin_pipe)
    export_controlnet(model, tmp_path / "cn")
    stock = StableDiffusionXLControlNetPipeline(
        **sdxl_components(tiny_sdxl_unet()), controlnet=ControlNetModel.from_pretrained(tmp_path / "cn")
    )
    with_export = sdxl_image(stock, image=control_image)
    print(
        f"SDXL plugin pipeline vs stock SDXL ControlNet pipeline image: max diff {abs(with_export - with_plugin).max():.3g}"
    )
    assert abs(with_plugin - sdxl_image(StableDiffusionXLPipeline(**sdxl_components(tiny_sdxl_unet())))).max() > 1e-3
    torch.testing.assert_close(torch.from_numpy(with_export), torch.from_numpy(with_plugin), rtol=0, atol=1e-5)


def test_imports_a_diffusers_controlnet_and_fine_tunes_it():
    unet = tiny_sdxl_unet()
    bare = copy.deepcopy(unet)
    published = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(HEAD))
    torch.manual_seed(3)
    with torch.no_grad():  # a "trained" ControlNet: its zero convolutions are no longer zero
        for param in [*published.controlnet_down_blocks.parameters(), *published.controlnet_mid_block.parameters()]:
            param.normal_(std=0.05)
        published.controlnet_cond_embedding.conv_out.weight.normal_(std=0.05)
    model = import_controlnet(unet, published)
    inputs, cond = sdxl_inputs(), control("sdxl")
    imported = fed_output(model, inputs, cond)
    reference = diffusers_output(bare, published, inputs, cond)
    print(f"SDXL imported ControlNetModel vs diffusers: max diff {(imported - reference).abs().max().item():.3g}")
    torch.testing.assert_close(imported, reference, rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hcp_controlnet_blocks.default." in n for n in trainable)
    losses = train(model, inputs, cond, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]


def test_trains_on_a_fixed_condition_and_the_output_depends_on_it():
    model = get_peft_model(tiny_sdxl_unet(), sdxl_config())
    inputs, cond = sdxl_inputs(), control("sdxl")
    other = control("sdxl", seed=2)
    assert torch.equal(fed_output(model, inputs, cond), fed_output(model, inputs, other))  # no-op at init
    losses = train(model, inputs, cond, steps=4)
    assert losses[-1] < losses[0]
    assert (fed_output(model, inputs, cond) - fed_output(model, inputs, other)).abs().max() > 1e-4


def test_saves_and_loads_in_a_fresh_process(tmp_path):
    model = get_peft_model(tiny_sdxl_unet(), sdxl_config(init_weights=False))
    save_file({"out": fed_output(model, sdxl_inputs(), control("sdxl"))}, tmp_path / "expected.safetensors")
    model.save_pretrained(tmp_path / "cn")
    script = f"""
        import torch, peft_hcp
        from peft import PeftModel
        from safetensors.torch import save_file
        from tests.controlnet_hosts import control, fed_output, sdxl_inputs, tiny_sdxl_unet
        model = PeftModel.from_pretrained(tiny_sdxl_unet(), {str(tmp_path / "cn")!r})
        save_file({{"out": fed_output(model, sdxl_inputs(), control("sdxl"))}}, {str(tmp_path / "got.safetensors")!r})
        """
    run_python(script, timeout=120)
    assert torch.equal(
        load_file(tmp_path / "got.safetensors")["out"], load_file(tmp_path / "expected.safetensors")["out"]
    )


@pytest.mark.parametrize(
    "change, missing",
    [
        ({"addition_embed_type": "text", "addition_embed_type_num_heads": 8}, "addition_embed_type='text'"),
        ({"num_class_embeds": 10}, "'class_embedding'"),
    ],
)
def test_other_added_embeddings_are_refused_before_anything_is_attached(change, missing):
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_sdxl_unet().config.items() if not k.startswith("_")}
    config.update(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    unet = UNet2DConditionModel(**{**config, **change})
    before = model_snapshot(unet)
    with pytest.raises(UnsupportedLayerError, match=f"UNet2DConditionModel.*{missing}"):
        get_peft_model(unet, sdxl_config())
    assert_model_unchanged(before, unet)
