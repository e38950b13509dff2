"""Several single-layer kinds on the same layers, in either attach order, saved and loaded as an adapter set."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft_hcp import HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.hub import attach, load_adapter, save_adapter
from tests.helpers import unet_out


KINDS = {"lora": HcpLoraConfig, "loha": HcpLohaConfig}


@pytest.mark.parametrize("order", [("lora", "loha"), ("loha", "lora"), ("lora", "lora")])
def test_stacked_kinds_round_trip_in_either_order(order, tmp_path):
    unet = tiny_unet()
    for index, kind in enumerate(order):
        config = KINDS[kind](target_modules=["re:.*attn1$", "conv_in"], init_weights=False, alpha=1.0 + index)
        attach(unet, config, f"{kind}{index}")
    batch = unet_inputs()
    out = unet_out(unet, batch)
    save_adapter(unet, str(tmp_path / "set"))
    for index, kind in enumerate(order):  # each adapter's file holds its own weights only, under PEFT's names
        keys = load_file(str(tmp_path / "set" / f"{kind}{index}" / "adapter_model.safetensors")).keys()
        assert keys and all(".base_layer." not in key for key in keys), sorted(keys)[:3]

    fresh = tiny_unet()
    load_adapter(fresh, str(tmp_path / "set"))
    assert list(fresh.peft_config) == [f"{kind}{index}" for index, kind in enumerate(order)]
    torch.testing.assert_close(unet_out(fresh, batch), out, rtol=0, atol=0)
    assert (out - unet_out(tiny_unet(), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("exporter", ["kohya", "comfyui", "diffusers"])
def test_a_file_format_of_one_network_per_layer_refuses_two_adapters_on_a_layer(exporter, tmp_path):
    from peft_hcp.hub.interchange import export_comfyui, export_diffusers, export_kohya

    export = {"kohya": export_kohya, "comfyui": export_comfyui, "diffusers": export_diffusers}[exporter]
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["attn1.to_q"], init_weights=False), "a")
    attach(unet, HcpLohaConfig(target_modules=["attn1.to_q"], init_weights=False), "b")
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"Adapters '[ab]' and '[ab]' both adapt '.*attn1\.to_q'.*adapter_names=\[\.\.\.\]"
    ):
        export(unet, str(out))
    assert not out.exists()
    export(unet, str(out), adapter_names=["a"])  # one at a time
    assert out.exists()
