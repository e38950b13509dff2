"""Run in a fresh process by ``test_quant_loading.py``: every adapter file of ``FOLDER`` onto the quantized host ``KIND``
and onto its dequantized float reference, then a LoRA trained on the quantized host onto the float reference.

``python -c '...main(KIND, FOLDER)'``; prints one line ``ROUTE max-abs-diff effect`` per route and raises on a failure.
"""

from __future__ import annotations

import os

import torch
from peft import PeftModel, get_peft_model

import peft_hcp
from peft_hcp.embedded import unet_inputs
from peft_hcp.hub.interchange import import_hcp, import_kohya
from peft_hcp.quant import quantization_of
from tests.quant.quant_hosts_io import (
    CONTROLNET_CHANNELS,
    TARGETS,
    dequantized_reference,
    load_host,
    output,
    quantized_layers,
    quantized_storage,
)


#: how far the quantized host's output may be from its float reference (same weights, the host's own kernels): torchao
#: and GGUF compute in fp32 from the same values; bnb 4-bit computes in bf16 after its first eval forward
TOLERANCE = {"torchao": 1e-4, "gguf": 1e-4, "nf4": 5e-3}
#: how far a quantized weight may read after an eval forward: bnb 4-bit's repacking for bf16 (see TOLERANCE) keeps its
#: block scales in bf16 (one bf16 rounding, 2**-8 relative); the others are read back exactly
STORAGE_RTOL = {"torchao": 0.0, "gguf": 0.0, "nf4": 2**-8}


def _check_storage(kind: str, before: dict, layers: dict, what: str) -> None:
    """The quantized ``layers`` hold what they held ``before``: the plugin never wrote to them."""
    for name, weight in quantized_storage(layers).items():
        torch.testing.assert_close(weight, before[name], rtol=STORAGE_RTOL[kind], atol=0, msg=f"{what}: {name}")


def _cond() -> torch.Tensor:
    scale = 2 ** (len(CONTROLNET_CHANNELS) - 1)
    return torch.rand(2, 3, 16 * scale, 16 * scale, generator=torch.Generator().manual_seed(3))


def _loaded(route: str, unet, folder: str):
    """``unet`` with the adapter of ``route`` loaded, and its output."""
    if route.startswith("saved_"):
        model = PeftModel.from_pretrained(unet, os.path.join(folder, route))
    elif route == "hcp_lora":
        import_hcp(unet, os.path.join(folder, "hcp.safetensors"))
        model = unet
    else:
        file = {"kohya_lora": "lora.safetensors", "lycoris_loha": "loha.safetensors"}.get(route)
        import_kohya(unet, os.path.join(folder, file or "diffusers/pytorch_lora_weights.safetensors"))
        model = unet
    if route == "saved_controlnet":
        with peft_hcp.feed(model, cond=_cond()):
            return model, output(model)
    return model, output(model)


ROUTES = ("saved_lora", "saved_loha", "saved_controlnet", "kohya_lora", "lycoris_loha", "diffusers_lora", "hcp_lora")


def main(kind: str, folder: str) -> None:
    torch.manual_seed(0)
    for route in ROUTES:
        host = load_host(kind, folder)
        layers = quantized_layers(host)
        assert layers, f"{kind}: no quantized layer"
        reference = dequantized_reference(host, folder)
        base = output(reference)
        storage = quantized_storage(layers)
        _, ours = _loaded(route, host, folder)
        _, expected = _loaded(route, reference, folder)
        diff = (ours - expected).abs().max().item()
        effect = (expected - base).abs().max().item()
        print(route, f"{diff:.3g}", f"{effect:.3g}", flush=True)
        assert effect > 1e-2, f"{route}: the adapter changes nothing"
        assert diff <= TOLERANCE[kind], f"{route} on {kind}: {diff} from the dequantized reference"
        assert all(quantization_of(m) is not None for m in layers.values()), f"{route}: a quantized layer changed"
        _check_storage(kind, storage, layers, route)
    _trained_on_quantized_loads_on_float(kind, folder)


def _trained_on_quantized_loads_on_float(kind: str, folder: str) -> None:
    host = load_host(kind, folder)
    layers = quantized_layers(host)
    storage = quantized_storage(layers)
    reference = dequantized_reference(host, folder)
    host_params = {id(p) for p in host.parameters()}
    model = get_peft_model(host, peft_hcp.HcpLoraConfig(target_modules=[TARGETS], r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(*unet_inputs()).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in host_params for p in trainable), "a host parameter trains"
    assert all(torch.equal(storage[n], w) for n, w in quantized_storage(layers).items()), "training changed the storage"
    model.save_pretrained(os.path.join(folder, f"trained_{kind}"))
    model.eval()
    ours = output(model)
    reference = PeftModel.from_pretrained(reference, os.path.join(folder, f"trained_{kind}"))
    diff = (ours - output(reference)).abs().max().item()
    print("trained_on_quantized_onto_float", f"{diff:.3g}", flush=True)
    assert diff <= TOLERANCE[kind], f"a LoRA trained on {kind}, loaded on float: {diff}"
