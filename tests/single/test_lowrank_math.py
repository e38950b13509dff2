"""HcpLora and HcpLoha compute exactly what PEFT's LoRA and LoHa compute, given the same weights."""

import copy

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model

from peft_hcp import HcpLohaConfig, HcpLoraConfig
from tests.helpers import unet_out


# attention + feed-forward linears, and the resnet convolutions (3x3) and shortcut (1x1)
TARGETS = ["re:.*attn.?$", "re:.*ff$", "re:.*resnets\\.\\d+\\.conv\\d$", "re:.*conv_shortcut$"]


def _hosts(peft_model) -> list[str]:
    return list(peft_model.base_model.targeted_module_names)


def _pair(unet, hcp_config, peft_config_factory):
    """(peft-hcp model, PEFT model) on identical copies of ``unet``, on the same layers."""
    reference_base = copy.deepcopy(unet)
    ours = get_peft_model(unet, hcp_config)
    reference = get_peft_model(reference_base, peft_config_factory(_hosts(ours)))
    assert sorted(_hosts(reference)) == sorted(_hosts(ours))
    return ours, reference


def test_lora_matches_peft_lora(unet, unet_batch):
    rank, peft_alpha = 4, 8
    ours, reference = _pair(
        unet,
        HcpLoraConfig(
            target_modules=TARGETS,
            r=rank,
            alpha=peft_alpha / rank,
            alpha_auto_scale=False,
            dropout=0.0,
            init_weights=False,
        ),
        lambda hosts: LoraConfig(target_modules=hosts, r=rank, lora_alpha=peft_alpha, lora_dropout=0.0),
    )
    conv_layers = 0
    for name in _hosts(ours):
        block = ours.base_model.model.get_submodule(name).hcp_lora_blocks["default"]
        layer = reference.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(block.lora_down.weight)
        layer.lora_B["default"].weight.data.copy_(block.lora_up.weight)
        conv_layers += isinstance(block.lora_down, torch.nn.Conv2d)
    assert conv_layers > 0 and len(_hosts(ours)) > conv_layers

    expected, actual = unet_out(reference, unet_batch), unet_out(ours, unet_batch)
    assert not torch.allclose(actual, unet_out_disabled(ours, unet_batch), atol=1e-4)  # the adapters do act
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def unet_out_disabled(model, batch):
    with model.disable_adapter():
        return unet_out(model, batch)


def test_lora_delta_weight_matches_peft(unet):
    ours, reference = _pair(
        unet,
        HcpLoraConfig(target_modules=TARGETS, r=3, alpha=6.0, init_weights=False),
        lambda hosts: LoraConfig(target_modules=hosts, r=3, lora_alpha=6.0),
    )
    for name in _hosts(ours):
        block = ours.base_model.model.get_submodule(name).hcp_lora_blocks["default"]
        layer = reference.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(block.lora_down.weight)
        layer.lora_B["default"].weight.data.copy_(block.lora_up.weight)
        torch.testing.assert_close(block.get_delta_weight(), layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_loha_matches_peft_loha(unet, unet_batch):
    rank, alpha = 2, 4.0
    ours, reference = _pair(
        unet,
        HcpLohaConfig(target_modules=TARGETS, r=rank, alpha=alpha, init_weights=False),
        lambda hosts: LoHaConfig(target_modules=hosts, r=rank, alpha=alpha, init_weights=False),
    )
    for name in _hosts(ours):
        block = ours.base_model.model.get_submodule(name).hcp_loha_blocks["default"]
        layer = reference.base_model.model.get_submodule(name)
        for param in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(layer, param)["default"].data.copy_(getattr(block, param))
    torch.testing.assert_close(unet_out(ours, unet_batch), unet_out(reference, unet_batch), atol=2e-6, rtol=1e-5)


def test_rank_as_float_ratio_of_output_features(unet):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=["re:.*attn1\\.to_q$", "re:.*ff\\.net\\.2$"], r=0.25))
    for name in _hosts(model):
        layer = model.base_model.model.get_submodule(name)
        assert layer.hcp_lora_blocks["default"].rank == max(1, round(layer.out_features * 0.25))


@pytest.mark.parametrize(("auto", "expected"), [(True, 0.5 / 4), (False, 0.5)])
def test_alpha_auto_scale(unet, auto, expected):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=["conv_in"], r=4, alpha=0.5, alpha_auto_scale=auto))
    assert model.base_model.model.conv_in.hcp_lora_blocks["default"].scaling == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, "4", True])
def test_bad_rank_is_rejected(bad):
    with pytest.raises(ValueError, match="r must|ratio"):
        HcpLoraConfig(target_modules=["conv_in"], r=bad)


def test_hcp_bias_true_is_a_bias_on_the_lora_path(unet, unet_batch):
    config = HcpLoraConfig(target_modules=["conv_in"], bias=True)
    assert (config.bias, config.lora_bias) == ("none", True)
    model = get_peft_model(unet, config)
    up = model.base_model.model.conv_in.hcp_lora_blocks["default"].lora_up
    assert up.bias is not None and up.bias.requires_grad
    before = unet_out(model, unet_batch)
    up.bias.data.fill_(0.1)
    after = unet_out(model, unet_batch)
    model.merge_adapter()
    torch.testing.assert_close(unet_out(model, unet_batch), after, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("config_cls", [HcpLoraConfig, HcpLohaConfig])
def test_diffusers_lora_compatible_layers_are_hosts(config_cls):
    from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    compatible = torch.nn.Sequential(
        LoRACompatibleConv(3, 8, 3, padding=1), torch.nn.Flatten(), LoRACompatibleLinear(8 * 16, 5)
    )
    compatible.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        base = plain(x)
    outputs = []
    for model in (plain, compatible):
        torch.manual_seed(1)
        adapted = get_peft_model(model, config_cls(target_modules=["0", "2"], init_weights=False))
        assert len(adapted.base_model.targeted_module_names) == 2
        with torch.no_grad():
            outputs.append(adapted(x))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outputs[0], base, atol=1e-4)
