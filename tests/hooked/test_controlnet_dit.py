"""ControlNet plugins on diffusion transformers (SD3, Flux), against diffusers' SD3ControlNetModel / FluxControlNetModel."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel
from peft import get_peft_model, inject_adapter_in_model
from torch import nn

import peft_hcp
from peft_hcp import (
    HcpControlNetConfig,
    HcpFluxControlNetConfig,
    HcpSD3ControlNetConfig,
    UnsupportedLayerError,
)
from peft_hcp.adapters.controlnet_bridge import export_controlnet, import_controlnet
from peft_hcp.embedded.models import tiny_flux, tiny_sd3
from tests.controlnet_hosts import HOSTS, control, fed_output, train
from tests.helpers import assert_model_unchanged, model_snapshot


KINDS = ["sd3", "flux"]


def config_for(kind: str, **kw):
    """Fewer copied blocks than the host has, so one control output reaches several host blocks."""
    if kind == "sd3":
        return HcpSD3ControlNetConfig(**{"num_layers": 2, **kw})
    return HcpFluxControlNetConfig(**{"num_layers": 2, "num_single_layers": 2, **kw})


def host_and_inputs(kind: str) -> tuple[nn.Module, dict]:
    build, inputs, _ = HOSTS[kind]
    return build(), inputs()


def diffusers_output(kind: str, host: nn.Module, controlnet, inputs: dict, cond: torch.Tensor) -> torch.Tensor:
    """The host's prediction with ``controlnet``'s outputs, fed as diffusers' ControlNet pipelines feed them."""
    with torch.no_grad():
        if kind == "sd3":
            pooled = inputs["pooled_projections"]
            if controlnet.config.force_zeros_for_pooled_projection:
                pooled = torch.zeros_like(pooled)
            (blocks,) = controlnet(
                hidden_states=inputs["hidden_states"],
                controlnet_cond=cond,
                timestep=inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                pooled_projections=pooled,
                return_dict=False,
            )
            return host(**inputs, block_controlnet_hidden_states=blocks).sample
        double, single = controlnet(controlnet_cond=cond, return_dict=False, **inputs)
        return host(**inputs, controlnet_block_samples=double, controlnet_single_block_samples=single).sample


def published_controlnet(kind: str, host: nn.Module):
    """A diffusers ControlNet made from ``host`` as diffusers' ``from_transformer`` makes it, then "trained"."""
    if kind == "sd3":
        controlnet = SD3ControlNetModel.from_transformer(host, num_layers=2, num_extra_conditioning_channels=0)
    else:
        controlnet = FluxControlNetModel.from_transformer(
            host, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=2
        )
    torch.manual_seed(3)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():  # the zero-initialised outputs and condition embedder
                param.normal_(std=0.05)
    return controlnet


@pytest.mark.parametrize("kind", KINDS)
def test_starts_as_a_no_op_with_copies_of_the_host(kind):
    host, inputs = host_and_inputs(kind)
    with torch.no_grad():
        base = host(**inputs).sample
    model = get_peft_model(host, config_for(kind))
    plugin = getattr(host, f"hcp_{kind}_controlnet").blocks["default"]
    assert torch.equal(
        plugin.transformer_blocks[1].state_dict()["ff.net.2.weight"], host.transformer_blocks[1].ff.net[2].weight
    )
    assert torch.equal(fed_output(model, inputs, control(kind)), base)


@pytest.mark.parametrize("kind", KINDS)
def test_exports_to_the_diffusers_controlnet_class_with_the_same_outputs(kind, tmp_path):
    host, inputs = host_and_inputs(kind)
    bare = copy.deepcopy(host)
    model = get_peft_model(host, config_for(kind, init_weights=False))
    cond = control(kind)
    expected = fed_output(model, inputs, cond)
    export_controlnet(model, tmp_path / "cn")
    assert sorted(os.listdir(tmp_path / "cn")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    controlnet = (SD3ControlNetModel if kind == "sd3" else FluxControlNetModel).from_pretrained(tmp_path / "cn")
    got = diffusers_output(kind, bare, controlnet, inputs, cond)
    print(f"{kind} plugin vs exported {type(controlnet).__name__}: max diff {(got - expected).abs().max().item():.3g}")
    with torch.no_grad():
        assert not torch.allclose(expected, bare(**inputs).sample, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_imports_a_diffusers_controlnet_and_fine_tunes_it(kind):
    host, inputs = host_and_inputs(kind)
    bare = copy.deepcopy(host)
    published = published_controlnet(kind, host)
    model = import_controlnet(host, published)
    cond = control(kind)
    imported = fed_output(model, inputs, cond)
    reference = diffusers_output(kind, bare, published, inputs, cond)
    print(
        f"{kind} imported {type(published).__name__} vs diffusers: max diff {(imported - reference).abs().max().item():.3g}"
    )
    torch.testing.assert_close(imported, reference, rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".hcp_{kind}_controlnet_blocks.default." in n for n in trainable)
    losses = train(model, inputs, cond, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_trains_on_a_fixed_condition_and_the_output_depends_on_it(kind):
    host, inputs = host_and_inputs(kind)
    model = get_peft_model(host, config_for(kind))
    cond, other = control(kind), control(kind, seed=2)
    assert torch.equal(fed_output(model, inputs, cond), fed_output(model, inputs, other))  # no-op at init
    losses = train(model, inputs, cond, steps=4)
    assert losses[-1] < losses[0]
    assert (fed_output(model, inputs, cond) - fed_output(model, inputs, other)).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_of_the_host_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        host, inputs = host_and_inputs(kind)
        model = get_peft_model(host, config_for(kind, init_weights=False))
        if checkpointing:
            host.enable_gradient_checkpointing()  # host blocks rerun in backward: their hooks add the kept outputs
        host.train()
        with peft_hcp.feed(model, cond=control(kind)):
            model(**inputs).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_each_host_block_gets_the_control_output_diffusers_gives_it():
    sd3 = get_peft_model(tiny_sd3(), config_for("sd3")).hcp_sd3_controlnet.blocks["default"]
    assert sd3.to_names == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]  # not the last
    assert sd3._slots == [(0, 0), (0, 0), (0, 1)]  # int(i / (4 / 2))
    flux = get_peft_model(tiny_flux(), config_for("flux", num_single_layers=3)).hcp_flux_controlnet.blocks["default"]
    assert flux._slots == [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)]  # i // ceil(n / N)


@pytest.mark.parametrize(
    "build, config, message",
    [
        (tiny_flux, HcpSD3ControlNetConfig(num_layers=1), "JointTransformerBlock.*FluxTransformer2DModel has"),
        (tiny_sd3, HcpFluxControlNetConfig(), "FluxTransformerBlock.*SD3Transformer2DModel has"),
        (tiny_sd3, HcpControlNetConfig(), "SD3Transformer2DModel has no down blocks"),
        (
            tiny_sd3,
            HcpSD3ControlNetConfig(num_layers=4),
            r"transformer_blocks \[3\] of SD3Transformer2DModel are context-pre-only",
        ),
        (tiny_flux, HcpFluxControlNetConfig(num_layers=9), "num_layers=9, but FluxTransformer2DModel has 3 blocks"),
        (tiny_sd3, HcpSD3ControlNetConfig(num_layers=1, to_layers=["proj_out"]), "'proj_out' is not a block"),
    ],
)
def test_unsupported_hosts_are_refused_and_left_exactly_as_they_were(build, config, message):
    for attach in (lambda m: get_peft_model(m, config), lambda m: inject_adapter_in_model(config, m)):
        host = build()
        before = model_snapshot(host)
        with pytest.raises(UnsupportedLayerError, match=message):
            attach(host)
        assert_model_unchanged(before, host)


def test_a_controlnet_made_for_another_model_is_refused_before_import():
    host = tiny_flux()
    union = FluxControlNetModel(**{**published_controlnet("flux", tiny_flux()).config, "num_mode": 3})
    before = model_snapshot(host)
    with pytest.raises(ValueError, match="num_mode: ControlNet 3, plugin on this host None"):
        import_controlnet(host, union)
    with pytest.raises(UnsupportedLayerError, match="FluxTransformer2DModel has"):
        import_controlnet(host, published_controlnet("sd3", tiny_sd3()))
    assert_model_unchanged(before, host)


def test_wrong_control_latents_are_clear_errors():
    model = get_peft_model(tiny_flux(), config_for("flux"))
    inputs = HOSTS["flux"][1]()
    with pytest.raises(ValueError, match=r"items of shape \(16, 16\); this call needs \(64, 16\)"):
        fed_output(model, inputs, torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="needs the input 'cond'"):
        model(**inputs)
    single = control("flux", batch=1)  # one condition for a batch of two: repeated
    torch.testing.assert_close(fed_output(model, inputs, single), fed_output(model, inputs, single.repeat(2, 1, 1)))
    with peft_hcp.feed(model, cond=single):
        assert model.get_base_model().hcp_flux_controlnet.blocks["default"].inputs["cond"] is single
