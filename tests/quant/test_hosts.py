"""Every single-layer kind on every quantized host, against the same adapter on a float host holding the
dequantized weights: outputs, gradients, untouched storage, merge within one quantization step (or refused
with the model unchanged), and an exact unmerge.

The hosts are built by ``peft_hcp.quant.quantize_model`` with the quantizers' own layers (bitsandbytes,
torchao, diffusers' GGUF and layerwise casting), on a one-layer model small enough for every test to run in
well under a second.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_hcp import HcpLohaConfig, HcpLokrConfig, HcpLoraConfig, MergeNotSupportedError
from peft_hcp.quant import dequantized_weight, quantization_of, quantize_model, weight_shape


pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytest.importorskip("gguf")

IN, OUT = 256, 64  # Q4_K holds rows of 256; bitsandbytes' CPU repacking wants 32 | OUT
HOSTS = ["int8-torchao", "nf4", "int8", "gguf-q8_0", "gguf-q4_k", "fp8"]
MORE_HOSTS = ["fp4", "int8-dynamic-torchao", "fp8-torchao", "gguf-q4_0"]
KINDS = {
    "lora": lambda: HcpLoraConfig(target_modules=["proj"], r=4, alpha=4.0),
    "dora": lambda: HcpLoraConfig(target_modules=["proj"], r=4, alpha=4.0, use_dora=True),
    "loha": lambda: HcpLohaConfig(target_modules=["proj"], r=4, alpha=4.0),
    "lokr": lambda: HcpLokrConfig(target_modules=["proj"], r=4, alpha=4.0),
}
REQUANTIZED = {"int8-torchao", "nf4", "int8", "fp8", "fp4", "int8-dynamic-torchao", "fp8-torchao"}


class Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def quantized_and_reference(scheme: str) -> tuple[nn.Module, nn.Module]:
    """A model quantized with ``scheme``, and a float one holding its dequantized weight and bias."""
    torch.manual_seed(0)
    model = Proj()
    assert quantize_model(model, scheme) == ["proj"]
    reference = Proj()
    host = model.proj
    with torch.no_grad():
        reference.proj.weight.copy_(dequantized_weight(host))
        reference.proj.bias.copy_(host.bias.to(reference.proj.bias.dtype))
    return model, reference


def with_adapter(model: nn.Module, kind: str):
    peft_model = get_peft_model(model, KINDS[kind]())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter: every factor random (an initial one is a no-op)
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.05
                param.copy_(param * 1.1 if name.endswith("dora_scale") else noise)
    return peft_model


def adapted_pair(scheme: str, kind: str):
    model, reference = quantized_and_reference(scheme)
    return with_adapter(model, kind), with_adapter(reference, kind)


def inputs() -> torch.Tensor:
    return torch.randn(8, IN, generator=torch.Generator().manual_seed(2))


def host_error(scheme: str, eval_mode: bool = False) -> float:
    """How far the quantized host's own output is from the float layer holding its dequantized weight."""
    model, reference = quantized_and_reference(scheme)
    model.train(not eval_mode)
    with torch.no_grad():
        return float((model(inputs()) - reference(inputs())).abs().max())


def storage(host: nn.Module) -> list[torch.Tensor]:
    """Copies of every tensor the host's quantized weight is stored in (codes, scales, packed absmax ...)."""
    weight = host.weight
    parts = [getattr(weight, name) for name in ("qdata", "scale") if hasattr(weight, name)] or [weight]
    state = getattr(weight, "quant_state", None)
    if state is not None:
        parts += [state.absmax, *([state.state2.absmax] if getattr(state, "state2", None) is not None else [])]
    for owner in (weight, getattr(host, "state", None)):
        if getattr(owner, "SCB", None) is not None:
            parts.append(owner.SCB)
    return [part.detach().as_subclass(torch.Tensor).clone() for part in parts]


def assert_same_storage(before: list[torch.Tensor], host: nn.Module) -> None:
    after = storage(host)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert old.dtype == new.dtype and torch.equal(old.view(torch.uint8), new.view(torch.uint8))


@pytest.mark.parametrize("scheme", HOSTS + MORE_HOSTS)
@pytest.mark.parametrize("kind", KINDS)
def test_output_and_gradients_match_the_dequantized_reference(scheme: str, kind: str) -> None:
    quantized, reference = adapted_pair(scheme, kind)
    x = inputs()
    out, expected = quantized(x), reference(x)
    # the adapter adds nothing to the host's own deviation from its dequantized weight (DoRA rescales it by ~1)
    tolerance = 2 * host_error(scheme) + 1e-5
    torch.testing.assert_close(out, expected, rtol=0, atol=tolerance)

    out.square().sum().backward()
    expected.square().sum().backward()
    grads = {name: p.grad for name, p in quantized.named_parameters() if p.grad is not None}
    assert grads and all("_blocks." in name for name in grads), sorted(grads)
    reference_grads = dict(reference.named_parameters())
    for name, grad in grads.items():
        want = reference_grads[name].grad
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-3 * float(want.abs().max()) + 1e-4 + 20 * tolerance)


@pytest.mark.parametrize("scheme", HOSTS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_leaves_the_quantized_storage_untouched(scheme: str, kind: str) -> None:
    model, _ = quantized_and_reference(scheme)
    host = model.proj
    before = storage(host)
    peft_model = with_adapter(model, kind)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    for _ in range(2):
        peft_model(inputs()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, trained[n]) for n, p in peft_model.named_parameters() if p.requires_grad)
    assert_same_storage(before, host)


def quantization_step(scheme: str, host: nn.Module, merged: torch.Tensor) -> torch.Tensor:
    """One quantization step of ``host``'s format around the float weight ``merged``, per weight element."""
    weight = host.weight
    if scheme in ("int8-torchao", "int8-dynamic-torchao"):
        return weight.scale.expand_as(merged)
    if scheme == "fp8-torchao":  # per row scale times the e4m3 spacing at the scaled value
        return weight.scale * fp8_spacing(merged / weight.scale)
    if scheme == "int8":
        scales = weight.SCB if weight.SCB is not None else host.state.SCB
        return (scales.float() / 127).view(-1, 1).expand_as(merged)
    if scheme in ("nf4", "fp4"):  # the widest gap of the 4-bit code times each 64-block's absmax
        gap = weight.quant_state.code.sort().values.diff().max()
        absmax = merged.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        return (gap * absmax * 1.01).expand(-1, 64).reshape(merged.shape)  # 1%: the double-quantized absmax
    if scheme == "fp8":
        return fp8_spacing(merged)
    raise AssertionError(scheme)


def fp8_spacing(value: torch.Tensor) -> torch.Tensor:
    """The distance between neighbouring float8_e4m3fn values around ``value`` (3 mantissa bits)."""
    exponent = torch.floor(torch.log2(value.abs().clamp(min=2.0**-6)))
    return 2.0 ** (exponent - 3)


@pytest.mark.parametrize("scheme", sorted(REQUANTIZED))
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_within_one_step_and_unmerge_restores_the_storage(scheme: str, kind: str) -> None:
    model, _ = quantized_and_reference(scheme)
    host = model.proj
    original, original_type = storage(host), type(host.weight)
    peft_model = with_adapter(model, kind)
    x = inputs()
    with torch.no_grad():
        unmerged = peft_model(x)
    layer = peft_model.base_model.model.proj
    exact = layer.merged_params(["default"])["weight"]  # W_dequantized + ΔW in float

    with pytest.warns(UserWarning, match="requantizes"):
        peft_model.merge_adapter()
    merged_host = layer.get_base_layer()
    assert type(merged_host.weight) is original_type
    requantized = dequantized_weight(merged_host)
    step = quantization_step(scheme, merged_host, exact)
    assert bool(((requantized - exact).abs() <= step).all()), float(((requantized - exact).abs() - step).max())
    with torch.no_grad():
        merged = peft_model(x)
    bound = x.abs() @ step.T + 2 * host_error(scheme) + 1e-5  # one step per weight, summed over the inputs
    assert bool(((merged - unmerged).abs() <= bound).all())

    peft_model.unmerge_adapter()
    assert_same_storage(original, layer.get_base_layer())
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8-torchao", "nf4", "int8", "fp8"])
def test_merge_and_unload_leaves_a_quantized_model(scheme: str) -> None:
    peft_model = with_adapter(quantized_and_reference(scheme)[0], "lora")
    x = inputs()
    with torch.no_grad():
        unmerged = peft_model(x)
    exact = peft_model.base_model.model.proj.merged_params(["default"])["weight"]
    with pytest.warns(UserWarning, match="requantizes"):
        merged = peft_model.merge_and_unload(safe_merge=True)
    assert isinstance(merged, Proj) and quantization_of(merged.proj) is not None
    bound = x.abs() @ quantization_step(scheme, merged.proj, exact).T + 2 * host_error(scheme) + 1e-5
    with torch.no_grad():
        assert bool(((merged(x) - unmerged).abs() <= bound).all())


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_k"])
@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload", "safe_merge"])
def test_gguf_merge_is_refused_and_changes_nothing(scheme: str, merge: str) -> None:
    peft_model = with_adapter(quantized_and_reference(scheme)[0], "loha")
    layer = peft_model.base_model.model.proj
    host = layer.get_base_layer()
    before = storage(host)
    x = inputs()
    with torch.no_grad():
        unmerged = peft_model(x)
    calls = {
        "merge_adapter": peft_model.merge_adapter,
        "merge_and_unload": peft_model.merge_and_unload,
        "safe_merge": lambda: peft_model.merge_and_unload(safe_merge=True),
    }
    with pytest.raises(MergeNotSupportedError, match=f"GGUF {scheme.split('-')[1].upper()}"):
        calls[merge]()
    assert peft_model.base_model.model.proj is layer and layer.get_base_layer() is host
    assert layer.merged_adapters == []
    assert_same_storage(before, host)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_k", "nf4"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_parameter_route_factors_have_the_logical_shape(scheme: str, kind: str) -> None:
    """The issue's silent error: LoHa built its factors over a GGUF weight's byte shape."""
    model, _ = quantized_and_reference(scheme)
    assert tuple(model.proj.weight.shape) != (OUT, IN)  # the storage is packed
    assert tuple(weight_shape(model.proj)) == (OUT, IN)
    layer = with_adapter(model, kind).base_model.model.proj
    assert tuple(layer.get_delta_weight("default").shape) == (OUT, IN)


def test_bnb_4bit_repacked_for_cpu_keeps_its_weight_and_merge() -> None:
    """On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight at the first eval no-grad forward; the table
    dequantizes the repacked layout (bf16 block scales), and a merge/unmerge there restores it exactly."""
    model, _ = quantized_and_reference("nf4")
    host = model.proj
    before = dequantized_weight(host)
    model.eval()
    with torch.no_grad():
        model(inputs())
    repacked = bool(getattr(host.weight.quant_state, "packing_format_for_cpu", False))
    after = dequantized_weight(host)
    # the bf16 block scales: 2^-8 relative
    torch.testing.assert_close(after, before, rtol=0, atol=2.0**-8 * float(before.abs().max()))
    peft_model = with_adapter(model, "loha")
    reference = Proj()
    with torch.no_grad():
        reference.proj.weight.copy_(after)
        reference.proj.bias.copy_(host.bias)
    reference = with_adapter(reference, "loha")
    peft_model.eval()
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), reference(x), rtol=0, atol=1e-5)
    stored = storage(peft_model.base_model.model.proj.get_base_layer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    assert_same_storage(stored, peft_model.base_model.model.proj.get_base_layer())
    assert repacked == bool(getattr(host.weight.quant_state, "packing_format_for_cpu", False))


def test_unknown_scheme_and_unfit_layer_are_refused() -> None:
    model = Proj()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="known: nf4"):
        quantize_model(model, "int3")
    small = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        quantize_model(small, "gguf-q4_k", modules=["0"])
    assert quantize_model(small, "gguf-q4_k") == []  # a whole-model pass leaves it in float
    assert type(model.proj) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
