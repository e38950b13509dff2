"""Adapters trained on a float UNet load, in a fresh process, onto the quantized UNets diffusers' loaders make (torchao
int8 through ``from_pretrained``, GGUF Q8_0 through ``from_single_file``; bnb nf4 by replacement, as diffusers'
``BitsAndBytesConfig`` cannot load without a GPU) and compute what they compute on the dequantized float UNet; a LoRA
trained on each quantized host loads onto that float UNet (``quant_loading_worker.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model

from peft_hcp import HcpControlNetConfig, HcpLohaConfig, HcpLoraConfig
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import export_diffusers, export_kohya
from tests.helpers import run_python
from tests.quant.quant_hosts_io import CONTROLNET_CHANNELS, HOSTS, TARGETS, hcp_file, write_float_unet
from tests.quant.quant_loading_worker import ROUTES


pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    """A float tiny UNet (folder and GGUF file) and, trained on it, every adapter file the worker loads."""
    folder = str(tmp_path_factory.mktemp("quant-loading"))
    write_float_unet(folder)
    from diffusers import UNet2DConditionModel

    def fresh():
        return UNet2DConditionModel.from_pretrained(os.path.join(folder, "float"))

    torch.manual_seed(0)
    for kind, config in (
        ("lora", HcpLoraConfig(target_modules=[TARGETS], init_weights=False, alpha=2.0)),
        ("loha", HcpLohaConfig(target_modules=[TARGETS], init_weights=False, alpha=32.0)),
        (
            "controlnet",
            HcpControlNetConfig(conditioning_embedding_out_channels=CONTROLNET_CHANNELS, init_weights=False),
        ),
    ):
        get_peft_model(fresh(), config).save_pretrained(os.path.join(folder, f"saved_{kind}"))
    lora = fresh()
    attach(lora, HcpLoraConfig(target_modules=[TARGETS], init_weights=False, alpha=2.0), "default")
    export_kohya(lora, os.path.join(folder, "lora.safetensors"))
    export_diffusers(lora, os.path.join(folder, "diffusers"))
    hcp_file(lora, os.path.join(folder, "hcp.safetensors"))
    loha = fresh()
    attach(loha, HcpLohaConfig(target_modules=[TARGETS], init_weights=False, alpha=32.0), "default")
    export_kohya(loha, os.path.join(folder, "loha.safetensors"))
    return folder


@pytest.mark.parametrize("kind", HOSTS)
def test_float_adapters_load_onto_quantized_hosts_in_a_fresh_process(kind, files):
    result = run_python(
        "from tests.quant.quant_loading_worker import main; main(sys.argv[1], sys.argv[2])", kind, files, timeout=280
    )
    lines = [
        line.split()
        for line in result.stdout.splitlines()
        if line and line.split()[0] in (*ROUTES, "trained_on_quantized_onto_float")
    ]
    assert [line[0] for line in lines] == [*ROUTES, "trained_on_quantized_onto_float"], result.stdout
