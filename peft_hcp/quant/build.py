"""``quantize_model``: turn a float model's ``nn.Linear`` layers into quantized hosts, in place, on any device.

diffusers cannot load a ``BitsAndBytesConfig`` model without a GPU, so the CLI and the tests build quantized
bases from float ones here, with each quantizer's own layer or tensor type (the hosts of
:mod:`peft_hcp.quant.hosts`). Convolutions stay in float: no quantized ``Conv2d`` runs on CPU (torchao has no
convolution for its tensors, bitsandbytes and GGUF have no conv layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from peft_hcp.base.snapshot import all_or_nothing
from peft_hcp.quant.hosts import quantization_of, require


@dataclass(frozen=True)
class Scheme:
    """A quantization ``quantize_model`` applies: the package it needs, what it does to one layer (returns the
    layer that takes its place, possibly the same one converted in place), and the multiple ``in_features``
    must be of."""

    package: str
    convert: Callable[[nn.Linear], nn.Module]
    in_multiple: int = 1


def _bnb_4bit(quant_type: str, double_quant: bool) -> Callable[[nn.Linear], nn.Module]:
    def convert(linear: nn.Linear) -> nn.Module:
        bnb = require("bitsandbytes", needed_for=f"quantize={quant_type}")
        weight = linear.weight
        host = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        host.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu"),
            requires_grad=False,
            quant_type=quant_type,
            compress_statistics=double_quant,
            module=host,
        )
        return _with_bias(host, linear).to(weight.device)

    return convert


def _bnb_int8(linear: nn.Linear) -> nn.Module:
    bnb = require("bitsandbytes", needed_for="quantize=int8")
    host = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=0.0
    )
    host.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    return _with_bias(host, linear).to(linear.weight.device)


def _with_bias(host: nn.Module, linear: nn.Linear) -> nn.Module:
    if linear.bias is not None:
        host.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return host


def _torchao(config_name: str) -> Callable[[nn.Linear], nn.Module]:
    def convert(linear: nn.Linear) -> nn.Module:
        quantization = require("torchao", "torchao.quantization", needed_for=f"torchao's {config_name}")
        quantization.quantize_(linear, getattr(quantization, config_name)(), filter_fn=lambda module, fqn: True)
        return linear

    return convert


def _layerwise_fp8(linear: nn.Linear) -> nn.Module:
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    apply_layerwise_casting_hook(linear, torch.float8_e4m3fn, linear.weight.dtype, non_blocking=False)
    return linear


def _gguf(type_name: str) -> Callable[[nn.Linear], nn.Module]:
    def convert(linear: nn.Linear) -> nn.Module:
        gguf = require("gguf", needed_for=f"quantize=gguf-{type_name.lower()}")
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        quant_type = gguf.GGMLQuantizationType[type_name]
        weight = linear.weight.detach().float().cpu()
        data = (
            encode_q4_k(weight)
            if type_name == "Q4_K"
            else torch.from_numpy(gguf.quants.quantize(weight.numpy(), quant_type))
        )
        host = GGUFLinear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=linear.weight.dtype
        )
        host.weight = GGUFParameter(data.to(linear.weight.device), quant_type=quant_type)
        return _with_bias(host, linear)

    return convert


#: the schemes :func:`quantize_model` knows, by name
SCHEMES: dict[str, Scheme] = {
    # bnb's CPU repacking at the first eval forward needs whole 64-value blocks per row (in_features % 64 == 0)
    "nf4": Scheme("bitsandbytes", _bnb_4bit("nf4", double_quant=True), in_multiple=64),
    "fp4": Scheme("bitsandbytes", _bnb_4bit("fp4", double_quant=False), in_multiple=64),
    "int8": Scheme("bitsandbytes", _bnb_int8),
    "int8-torchao": Scheme("torchao", _torchao("Int8WeightOnlyConfig")),
    "int8-dynamic-torchao": Scheme("torchao", _torchao("Int8DynamicActivationInt8WeightConfig")),
    "fp8-torchao": Scheme("torchao", _torchao("Float8WeightOnlyConfig")),
    "fp8": Scheme("diffusers", _layerwise_fp8),
    "gguf-q8_0": Scheme("gguf", _gguf("Q8_0"), in_multiple=32),
    "gguf-q4_0": Scheme("gguf", _gguf("Q4_0"), in_multiple=32),
    "gguf-q4_k": Scheme("gguf", _gguf("Q4_K"), in_multiple=256),
}


def quantize_model(model: nn.Module, scheme: str, *, modules: Optional[Iterable[str]] = None) -> list[str]:
    """Quantize ``model``'s float ``nn.Linear`` layers with ``scheme`` (a key of :data:`SCHEMES`), in place.

    ``modules`` names the layers to quantize; each must be a float ``nn.Linear`` whose ``in_features`` the scheme
    can hold. Without it every float ``nn.Linear`` is quantized, except those the scheme cannot hold (a GGUF
    block size that does not divide ``in_features``), which stay float. Returns the names of the quantized
    layers. A refusal (an unknown scheme, a missing package, a layer named in ``modules`` that does not fit)
    leaves the model unchanged.

    Schemes: ``nf4`` (bitsandbytes ``Linear4bit``, double quant), ``fp4`` (``Linear4bit``), ``int8``
    (bitsandbytes ``Linear8bitLt``), ``int8-torchao`` / ``int8-dynamic-torchao`` / ``fp8-torchao`` (torchao
    ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig`` / ``Float8WeightOnlyConfig``), ``fp8``
    (diffusers' layerwise casting to ``float8_e4m3fn``, computing in the layer's dtype), ``gguf-q8_0`` /
    ``gguf-q4_0`` / ``gguf-q4_k`` (diffusers' ``GGUFLinear``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}.")
    chosen = SCHEMES[scheme]
    require(chosen.package, needed_for=f"The quantization scheme {scheme!r}")
    targets = _targets(model, chosen, scheme, modules)
    with torch.no_grad(), all_or_nothing(model):
        for name, linear in targets:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, chosen.convert(linear))
    return [name for name, _ in targets]


def _targets(
    model: nn.Module, scheme: Scheme, scheme_name: str, modules: Optional[Iterable[str]]
) -> list[tuple[str, nn.Linear]]:
    def fits(module: Any) -> bool:
        return module.in_features % scheme.in_multiple == 0

    def quantizable(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and quantization_of(module) is None

    if modules is None:
        return [(name, m) for name, m in model.named_modules() if name and quantizable(m) and fits(m)]
    found = dict(model.named_modules())
    targets = []
    for name in modules:
        module = found.get(name)
        if module is None or not quantizable(module):
            kind = "no such module" if module is None else type(module).__name__
            raise ValueError(f"quantize_model({scheme_name!r}): {name!r} is not a float nn.Linear ({kind}).")
        if not fits(module):
            raise ValueError(
                f"quantize_model({scheme_name!r}): {name!r} has in_features={module.in_features}, "
                f"not a multiple of the block size {scheme.in_multiple}."
            )
        targets.append((name, module))
    return targets


def encode_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """GGML Q4_K blocks of a float ``(rows, k * 256)`` weight, as ``(rows, k * 144)`` bytes.

    ``gguf`` (the Python package) quantizes no K-quant, so this is a plain min/max encoder of the format
    diffusers' ``dequantize_blocks_Q4_K`` reads: per 256 values an fp16 scale ``d`` and min ``dmin``, eight
    6-bit sub-block scales and mins (12 bytes), and 4-bit codes (128 bytes); a value is
    ``d * sc_j * q - dmin * m_j``. (llama.cpp searches the scales for a smaller error; this does not.)
    """
    rows = weight.shape[0]
    x = weight.detach().float().reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks of 32
    low = x.amin(dim=-1).clamp(max=0)
    scale = (x.amax(dim=-1) - low) / 15
    d = (scale.amax(dim=-1) / 63).half()
    dmin = ((-low).amax(dim=-1) / 63).half()
    sc = (scale / d.float().clamp(min=1e-30)[:, None]).round().clamp(0, 63).to(torch.uint8)
    mn = (-low / dmin.float().clamp(min=1e-30)[:, None]).round().clamp(0, 63).to(torch.uint8)
    step = (d.float()[:, None] * sc.float())[..., None]
    offset = (dmin.float()[:, None] * mn.float())[..., None]
    q = torch.where(step > 0, (x + offset) / step.clamp(min=1e-30), torch.zeros_like(x)).round().clamp(0, 15)
    q = q.to(torch.uint8)  # (blocks, 8, 32)
    packed_scales = torch.cat(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        dim=1,
    )
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = torch.cat(
        [d.view(torch.uint8).reshape(-1, 2), dmin.view(torch.uint8).reshape(-1, 2), packed_scales, codes], dim=1
    )
    return blocks.reshape(rows, -1)
