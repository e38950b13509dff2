"""Quantized tiny UNets as a user gets them (diffusers' loaders, or bnb layers by replacement), their dequantized
float references, and the adapter files the loading tests put on them.

Hosts: ``torchao`` (``from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``), ``gguf``
(``from_single_file`` of a Q8_0 GGUF file written here with the ``gguf`` package), ``nf4`` (diffusers'
``BitsAndBytesConfig`` needs a GPU to load: bnb's ``Linear4bit`` by replacement, :func:`peft_hcp.quant.quantize_model`)
and ``float`` (the plain model).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.quant import dequantized_weight, quantization_of, quantize_model


HOSTS = ("torchao", "gguf", "nf4")
#: the layers the LoRA / LoHa files adapt: quantized Linears (attention, feed-forward) and float convolutions
TARGETS = r"re:.*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|resnets\.\d+\.conv[12])"
CONTROLNET_CHANNELS = [8, 16]


def write_float_unet(folder: str) -> UNet2DConditionModel:
    """The tiny UNet as a diffusers folder ``folder/float`` and as a Q8_0 GGUF file ``folder/unet.gguf``."""
    unet = tiny_unet()
    unet.save_pretrained(os.path.join(folder, "float"))
    write_gguf(unet, os.path.join(folder, "unet.gguf"))
    return unet


def write_gguf(model: nn.Module, path: str) -> None:
    """``model``'s state dict under its diffusers names (which ``from_single_file`` keeps as they are): Linear
    weights in Q8_0, everything else F32 (diffusers' GGUF layers replace Linears only)."""
    import gguf

    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    writer = gguf.GGUFWriter(path, arch="sd")
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith(".weight") and name.removesuffix(".weight") in linears:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_host(kind: str, folder: str) -> UNet2DConditionModel:
    """The tiny UNet of ``folder`` loaded as the host ``kind`` (see the module docstring)."""
    path = os.path.join(folder, "float")
    if kind == "torchao":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
        return UNet2DConditionModel.from_pretrained(path, quantization_config=config, torch_dtype=torch.float32)
    if kind == "gguf":
        from diffusers import GGUFQuantizationConfig

        config = GGUFQuantizationConfig(compute_dtype=torch.float32)
        return UNet2DConditionModel.from_single_file(
            os.path.join(folder, "unet.gguf"), config=path, quantization_config=config
        )
    unet = UNet2DConditionModel.from_pretrained(path)
    if kind != "float":
        quantize_model(unet, kind)
    return unet


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers of ``model`` by name (the hosts, not PEFT's tuner layers around them)."""
    return {
        name: m
        for name, m in model.named_modules()
        if not isinstance(m, BaseTunerLayer) and quantization_of(m) is not None
    }


def dequantized_reference(quantized: nn.Module, folder: str) -> UNet2DConditionModel:
    """The float UNet of ``folder`` holding the dequantized weights of every quantized layer of ``quantized``."""
    reference = UNet2DConditionModel.from_pretrained(os.path.join(folder, "float"))
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            reference.get_submodule(name).weight.copy_(dequantized_weight(layer))
            if layer.bias is not None:
                reference.get_submodule(name).bias.copy_(layer.bias)
    return reference


def quantized_storage(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """What the quantized ``layers`` hold, as their dequantized weights (a change to the storage shows)."""
    return {name: dequantized_weight(layer).clone() for name, layer in layers.items()}


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*unet_inputs()).sample


def hcp_file(lora_model: nn.Module, path: str) -> None:
    """The LoRA adapter of ``lora_model`` as an HCP-Diffusion plugin checkpoint (``alpha`` = HCP's scale)."""
    state = {}
    for name, module in lora_model.named_modules():
        blocks = getattr(module, "blocks", None)
        if blocks is None or "default" not in blocks or not hasattr(blocks["default"], "lora_down"):
            continue
        block = blocks["default"]
        layer = f"denoiser.{name}"
        state[f"{layer}.___.layer.W_down"] = block.lora_down.weight.detach().contiguous()
        state[f"{layer}.___.layer.W_up"] = block.lora_up.weight.detach().contiguous()
        state[f"{layer}.___.alpha"] = torch.tensor(float(block.base_scaling))
    save_file(state, path)
