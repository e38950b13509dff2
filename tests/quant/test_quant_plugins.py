"""ControlNet, skip and patch plugins on quantized hosts, against the same plugin on a float host holding the
dequantized weights: the ControlNet's trainable copy is float (in the compute dtype), gradients reach only the
plugin, and training leaves the quantized storage as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_hcp
from peft_hcp import HcpControlNetConfig, HcpFluxControlNetConfig, HcpPReLUConfig, HcpSD3ControlNetConfig, HcpSkipConfig
from peft_hcp.embedded import tiny_unet, unet_inputs
from tests.controlnet_hosts import HOSTS, control


quant = pytest.importorskip("peft_hcp.quant")
pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

#: the schemes the ControlNet on a UNet runs on (the DiT hosts take two of them: a ControlNet copies the same way there)
SCHEMES = ("nf4", "int8", "int8-torchao", "gguf-q8_0", "fp8")
#: the plugin on the quantized host against the plugin on its dequantized float twin: the host's kernels compute in
#: fp32 from the same values (bnb 4-bit in training mode dequantizes and computes in the input's dtype)
TOLERANCE = 1e-4
CONTROLNETS = {
    "sdxl": lambda: HcpControlNetConfig(conditioning_embedding_out_channels=[8, 16], init_weights=False),
    "sd3": lambda: HcpSD3ControlNetConfig(num_layers=2, init_weights=False),
    "flux": lambda: HcpFluxControlNetConfig(num_layers=2, num_single_layers=2, init_weights=False),
}


def quantized_and_reference(build, scheme: str) -> tuple[nn.Module, nn.Module]:
    """``build()`` quantized with ``scheme``, and a float copy holding its dequantized weights."""
    model = build()
    reference = copy.deepcopy(model)
    quant.quantize_model(model, scheme)
    layers = quantized_layers(model)
    assert layers, f"{scheme} quantized no layer"
    with torch.no_grad():
        for name, layer in layers.items():
            twin = reference.get_submodule(name)
            twin.weight.copy_(quant.dequantized_weight(layer))
            if layer.bias is not None:  # stored in fp8 too under layerwise casting
                twin.bias.copy_(layer.bias)
    return model, reference


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if quant.quantization_of(m) is not None}


def storage(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: quant.dequantized_weight(layer).clone() for name, layer in layers.items()}


def attach_same(config, *models: nn.Module) -> list[nn.Module]:
    """``config`` on each of ``models`` from the same random draws."""
    adapted = []
    for model in models:
        torch.manual_seed(0)
        adapted.append(get_peft_model(model, copy.deepcopy(config)))
    return adapted


def train_steps(model: nn.Module, forward, steps: int = 2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        forward().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def check_trained_plugin_only(
    model: nn.Module, host_params: set[int], layers: dict[str, nn.Module], before: dict, forward
) -> None:
    """A backward gives gradients to plugin parameters only (none of ``host_params``, the ids of the host's own), and
    training changes no quantized storage."""
    model.train()
    forward().square().mean().backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    assert with_grad and not any(id(p) in host_params for p in with_grad)
    assert all(p.grad is None for m in layers.values() for p in m.parameters())
    model.zero_grad()
    train_steps(model, forward)
    after = storage(layers)
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(
    "kind, scheme", [("sdxl", scheme) for scheme in SCHEMES] + [("sd3", "int8-torchao"), ("flux", "nf4")]
)
def test_controlnet_copy_is_float_and_computes_what_it_does_on_the_dequantized_host(kind, scheme):
    build, inputs_of, _ = HOSTS[kind]
    host, reference = quantized_and_reference(build, scheme)
    layers, inputs, cond = quantized_layers(host), inputs_of(), control(kind)
    before, host_params = storage(layers), {id(p) for p in host.parameters()}
    with torch.no_grad():
        base = reference(**inputs).sample
    model, expected = attach_same(CONTROLNETS[kind](), host, reference)
    plugin = next(m for m in host.modules() if isinstance(m, peft_hcp.MultiPluginBlock))
    assert not quantized_layers(plugin), "the trainable copy kept quantized layers"
    assert all(p.dtype == torch.float32 and p.requires_grad for p in plugin.parameters())

    def forward(m=model):
        with peft_hcp.feed(m, cond=cond):
            return m(**inputs).sample

    for m in (model, expected):
        m.train()  # bnb 4-bit repacks its weight at its first eval forward on this CPU: compare in training mode
    with torch.no_grad():
        ours, theirs = forward(), forward(expected)
    assert (theirs - base).abs().max() > 1e-3  # the ControlNet (random outputs) changes the prediction
    torch.testing.assert_close(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE)
    check_trained_plugin_only(model, host_params, layers, before, forward)


#: quantized layers under every scheme (in_features 128): the input of one feeds the output of the other
SKIP_FROM = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
SKIP_TO = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
PLUGINS = {
    "skip": HcpSkipConfig(
        from_layer=[SKIP_FROM],
        to_layer=[SKIP_TO],
        init_weights=False,
    ),
    "prelu": HcpPReLUConfig(target_modules=["re:.*nonlinearity"], init_weights=False),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_skip_and_patch_plugins_on_quantized_modules(plugin, scheme):
    host, reference = quantized_and_reference(tiny_unet, scheme)
    layers = quantized_layers(host)
    assert {SKIP_FROM, SKIP_TO} <= set(layers)
    before, host_params = storage(layers), {id(p) for p in host.parameters()}
    batch = unet_inputs()
    with torch.no_grad():
        base = reference(*batch).sample
    model, expected = attach_same(PLUGINS[plugin], host, reference)
    for m in (model, expected):
        m.train()
    with torch.no_grad():
        ours, theirs = model(*batch).sample, expected(*batch).sample
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE)
    check_trained_plugin_only(model, host_params, layers, before, lambda: model(*batch).sample)
