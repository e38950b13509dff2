"""The two-model target of the untrusted-set tests: a tiny UNet and a tiny CLIP text encoder, every kind attached."""

from __future__ import annotations

import types

import torch

from peft_hcp import HcpLohaConfig, HcpLokrConfig, HcpLoraConfig, HcpPReLUConfig, HcpSkipConfig
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet
from peft_hcp.hub import attach


#: the UNet layers the LoRA of :func:`adapted_models` adapts
LORA_TARGETS = ["re:.*attn1\\.to_(q|v)$"]


def adapted_models(seed: int) -> types.SimpleNamespace:
    """A pipeline-like target (``components``): LoRA, LoHa, skip and PReLU on the UNet, LoKr on the text encoder,
    with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    unet, text = tiny_unet(), tiny_clip_text_model()
    attach(unet, HcpLoraConfig(target_modules=LORA_TARGETS, init_weights=False), "lora")
    attach(unet, HcpLohaConfig(target_modules=["re:.*ff\\.net\\.2$"], init_weights=False), "loha")
    skip = HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"], init_weights=False)
    attach(unet, skip, "skip")
    attach(unet, HcpPReLUConfig(target_modules=["re:.*nonlinearity$"], init_weights=False), "prelu")
    attach(text, HcpLokrConfig(target_modules=["re:.*self_attn\\.(q|v)_proj$"], init_weights=False), "te")
    return types.SimpleNamespace(components={"unet": unet, "text_encoder": text})


def bare_models() -> types.SimpleNamespace:
    """The same two models without adapters, frozen as loading for inference leaves them."""
    unet, text = tiny_unet(), tiny_clip_text_model()
    for model in (unet, text):
        model.requires_grad_(False)
    return types.SimpleNamespace(components={"unet": unet, "text_encoder": text})
