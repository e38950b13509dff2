"""The host table itself: routes beside a host that must run itself, eval-mode kernels, layerwise-cast
convolutions, a missing quantizer, and ``import peft_hcp`` importing no quantizer."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from diffusers.hooks import apply_layerwise_casting
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

from peft_hcp import HcpLohaConfig, HcpLoraConfig, QuantizerMissingError
from peft_hcp.hub.interchange.kohya import export_kohya, import_kohya
from peft_hcp.quant import dequantized_weight, host_type, quantization_of, quantize_model
from tests.helpers import run_python, unet_out
from tests.quant.test_hosts import HOSTS, KINDS, adapted_pair, host_error, inputs, quantized_and_reference


pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytest.importorskip("gguf")


@pytest.mark.parametrize("scheme", HOSTS)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_outputs_match_the_reference(scheme: str, kind: str) -> None:
    """In eval mode bnb int8 quantizes its input and bnb 4-bit repacks to a bf16 kernel: the adapted layer stays
    within the host's own deviation of the dequantized reference."""
    quantized, reference = adapted_pair(scheme, kind)
    quantized.eval(), reference.eval()
    with torch.no_grad():
        out, expected = quantized(inputs()), reference(inputs())
    torch.testing.assert_close(out, expected, rtol=0, atol=2 * host_error(scheme, eval_mode=True) + 1e-5)


@pytest.mark.parametrize("scheme", ["nf4", "int8-torchao", "gguf-q4_k"])
def test_lora_and_loha_stacked_on_a_quantized_host(scheme: str) -> None:
    """With another adapter's layer between LoHa's and the host, the host runs itself and LoHa's change to the
    dequantized weight is applied beside it."""
    model, reference = quantized_and_reference(scheme)
    for target in (model, reference):
        inject_adapter_in_model(HcpLoraConfig(target_modules=["proj"], init_weights=False), target, "lora")
        inject_adapter_in_model(HcpLohaConfig(target_modules=["proj"], init_weights=False), target, "loha")
    assert quantization_of(model.proj.base_layer.base_layer) is not None
    with torch.no_grad():
        reference.proj.base_layer.hcp_lora_blocks.load_state_dict(model.proj.base_layer.hcp_lora_blocks.state_dict())
        reference.proj.hcp_loha_blocks.load_state_dict(model.proj.hcp_loha_blocks.state_dict())
        torch.testing.assert_close(model(inputs()), reference(inputs()), rtol=0, atol=2 * host_error(scheme) + 1e-5)


def test_a_hooked_quantized_host_runs_its_hooks() -> None:
    model, reference = quantized_and_reference("gguf-q8_0")
    seen = []
    for target in (model, reference):
        target.proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        inject_adapter_in_model(HcpLohaConfig(target_modules=["proj"], init_weights=False), target)
    reference.proj.hcp_loha_blocks.load_state_dict(model.proj.hcp_loha_blocks.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(inputs()), reference(inputs()), rtol=0, atol=1e-5)
    assert len(seen) == 2


def test_loha_on_a_layerwise_cast_conv() -> None:
    """Layerwise casting also stores convolutions in fp8 (the one quantized conv that runs on CPU)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    apply_layerwise_casting(conv, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=())
    assert host_type(conv[0]).name(conv[0]).startswith("layerwise casting (float8_e4m3fn")
    reference = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    with torch.no_grad():
        reference[0].weight.copy_(dequantized_weight(conv[0]))
        reference[0].bias.copy_(conv[0].bias.float())
    for target in (conv, reference):
        inject_adapter_in_model(HcpLohaConfig(target_modules=["0"], init_weights=False), target)
    reference[0].hcp_loha_blocks.load_state_dict(conv[0].hcp_loha_blocks.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(conv(x), reference(x), rtol=0, atol=1e-5)
    assert conv[0].base_layer.weight.dtype == torch.float8_e4m3fn  # the storage stays fp8


def test_a_missing_quantizer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    nf4, _ = quantized_and_reference("nf4")
    gguf, _ = quantized_and_reference("gguf-q8_0")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setitem(sys.modules, "diffusers.quantizers.gguf.utils", None)
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(QuantizerMissingError, match=r"'nf4' needs the package 'bitsandbytes'.*peft-hcp\[quant\]"):
        quantize_model(model, "nf4")
    assert type(model[0]) is nn.Linear
    with pytest.raises(QuantizerMissingError, match="bnb nf4 .* needs the package 'bitsandbytes'"):
        dequantized_weight(nf4.proj)
    with pytest.raises(QuantizerMissingError, match="GGUF Q8_0 host needs the package 'gguf'"):
        dequantized_weight(gguf.proj)
    assert quantization_of(nf4.proj).family == "bnb 4-bit"  # recognised without the package


def test_import_loads_no_quantizer_of_its_own() -> None:
    """``import peft`` already imports bitsandbytes and torchao when installed; peft-hcp adds none (gguf, diffusers'
    GGUF layers), also when its LoRA and the host table are used on a float layer."""
    result = run_python(
        """
        import peft
        quantizers = {"bitsandbytes", "torchao", "gguf", "diffusers.quantizers.gguf.utils"}
        before = quantizers & set(sys.modules)
        import peft_hcp
        from peft_hcp import HcpLoraConfig
        from peft_hcp.quant import quantization_of
        assert quantization_of(torch.nn.Linear(2, 2)) is None
        print(sorted(quantizers & set(sys.modules) - before))
        """
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("scheme", ["nf4", "int8", "gguf-q4_k", "int8-torchao", "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapters_load_across_float_and_quantized_hosts(tmp_path, scheme: str, kind: str) -> None:
    """A saved adapter is checked against its file on a meta twin of the host (the logical shape), and loads onto
    a quantized host from a float one and back."""
    quantized, reference = adapted_pair(scheme, kind)
    quantized.save_pretrained(tmp_path / "quantized")
    reference.save_pretrained(tmp_path / "float")
    onto_float = PeftModel.from_pretrained(quantized_and_reference(scheme)[1], tmp_path / "quantized")
    onto_quantized = PeftModel.from_pretrained(quantized_and_reference(scheme)[0], tmp_path / "float")
    quantized.eval(), reference.eval()  # as from_pretrained leaves the models it loads
    with torch.no_grad():
        x = inputs()
        tolerance = 2 * host_error(scheme, eval_mode=True) + 1e-5
        torch.testing.assert_close(onto_float(x), reference(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(onto_quantized(x), quantized(x), rtol=0, atol=tolerance)


@pytest.mark.parametrize("scheme", ["nf4", "gguf-q8_0"])
def test_kohya_file_imports_onto_a_quantized_unet(tmp_path, unet, unet_batch, scheme: str) -> None:
    """A LyCORIS LoHa file exported from a float UNet imports onto the quantized one (every Linear quantized,
    convolutions float) and computes as on a float UNet holding the dequantized weights."""
    quantized = copy.deepcopy(unet)
    names = quantize_model(quantized, scheme)
    assert names and all(quantization_of(quantized.get_submodule(name)) for name in names)
    with torch.no_grad():
        for name in names:
            unet.get_submodule(name).weight.copy_(dequantized_weight(quantized.get_submodule(name)))
    trained = get_peft_model(copy.deepcopy(unet), HcpLohaConfig(target_modules=[""], r=2, init_weights=False))
    export_kohya(trained, str(tmp_path / "loha.safetensors"))
    import_kohya(quantized, str(tmp_path / "loha.safetensors"))
    torch.testing.assert_close(unet_out(quantized, unet_batch), unet_out(trained, unet_batch), rtol=0, atol=1e-5)
    assert not torch.equal(unet_out(trained, unet_batch), unet_out(unet, unet_batch))  # the file does something
