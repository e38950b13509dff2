"""PEFT behaviour of the single-layer plugins: training, several adapters, save/load, diffusers. (Disable, merge,
unload and a save loaded in a fresh process, for every registered type: ``tests/contract/test_matrix.py``.)"""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from peft_hcp import HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_unet
from tests.helpers import unet_out


TARGETS = ["re:.*attn.?$", "re:.*ff$"]
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config_cls", [HcpLoraConfig, HcpLohaConfig])
def test_only_adapter_weights_train_and_loss_falls(unet, unet_batch, config_cls):
    model = get_peft_model(unet, config_cls(target_modules=TARGETS, r=4, alpha=4.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = f"{config_cls.type_name}_blocks"
    assert trainable and all(prefix in n for n in trainable)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if prefix in n)
    assert n_all == n_trainable + sum(p.numel() for p in tiny_unet().parameters())

    before = _state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sample, timestep, text = unet_batch
    target = torch.full_like(sample, 0.3)
    losses = []
    model.train()
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(sample, timestep, text).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(prefix in k for k in changed)


def test_init_weights_true_starts_as_no_op(unet, unet_batch):
    base_out = unet_out(unet, unet_batch)
    for config in (HcpLoraConfig(target_modules=TARGETS), HcpLohaConfig(target_modules=TARGETS)):
        model = get_peft_model(tiny_unet(), config)
        assert torch.equal(unet_out(model, unet_batch), base_out)


def test_several_adapters_switch_and_delete(unet, unet_batch):
    base_out, base_keys = unet_out(unet, unet_batch), set(unet.state_dict())
    model = get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, init_weights=False))
    out_a = unet_out(model, unet_batch)
    model.add_adapter("b", HcpLoraConfig(target_modules=["re:.*attn2$", "conv_out"], init_weights=False))
    assert model.active_adapter == "default" and torch.equal(unet_out(model, unet_batch), out_a)
    model.set_adapter("b")
    out_b = unet_out(model, unet_batch)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    # training the active adapter only
    assert all("default" not in n for n, p in model.named_parameters() if p.requires_grad)

    model.delete_adapter("b")
    assert model.active_adapter == "default" and torch.equal(unet_out(model, unet_batch), out_a)
    assert type(model.base_model.model.conv_out) is torch.nn.Conv2d  # a host left without adapters is restored
    model.delete_adapter("default")
    assert set(model.base_model.model.state_dict()) == base_keys
    assert torch.equal(unet_out(model.base_model.model, unet_batch), base_out)


def test_two_adapters_stacked_on_one_layer_both_act(unet):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=[TO_Q], init_weights=False))
    model.add_adapter("b", HcpLoraConfig(target_modules=["re:.*attn1$"], init_weights=False))
    layer = model.base_model.model.get_submodule(TO_Q)
    x = torch.randn(3, layer.in_features)
    base = layer.base_layer(x)
    deltas = {}
    for name in ("default", "b"):
        model.base_model.set_adapter(name)
        deltas[name] = layer(x) - base
    model.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(layer(x) - base, deltas["default"] + deltas["b"], atol=1e-6, rtol=1e-5)
    assert all(d.abs().max() > 1e-3 for d in deltas.values())


def test_one_config_selecting_a_layer_twice_attaches_once(unet):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=["re:.*attn1$", TO_Q]))
    layer = model.base_model.model.get_submodule(TO_Q)
    assert list(layer.hcp_lora_blocks) == ["default"]
    assert model.base_model.targeted_module_names.count(TO_Q) == 1


def test_lora_and_loha_stacked_in_place_both_act(unet):
    inject_adapter_in_model(HcpLoraConfig(target_modules=[TO_Q], init_weights=False), unet, "lora")
    inject_adapter_in_model(HcpLohaConfig(target_modules=[TO_Q], init_weights=False), unet, "loha")
    outer = unet.get_submodule(TO_Q)
    inner = outer.base_layer
    host = inner.base_layer
    x = torch.randn(3, host.in_features)
    lora, loha = inner.hcp_lora_blocks["lora"], outer.hcp_loha_blocks["loha"]
    expected = torch.nn.functional.linear(x, host.weight + loha.get_delta_weight()) + lora(
        (x,), torch.zeros(3, host.out_features)
    )
    torch.testing.assert_close(outer(x), expected, atol=1e-6, rtol=1e-5)
    assert set(unet.peft_config) == {"lora", "loha"}


def test_deepcopy_is_independent(unet, unet_batch):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, init_weights=False))
    clone = copy.deepcopy(model)
    assert torch.equal(unet_out(clone, unet_batch), unet_out(model, unet_batch))
    clone.base_model.model.get_submodule(TO_Q).hcp_lora_blocks["default"].lora_up.weight.data.zero_()
    assert not torch.equal(unet_out(clone, unet_batch), unet_out(model, unet_batch))


def test_diffusers_adapter_api(unet, unet_batch):
    base_out = unet_out(unet, unet_batch)
    unet.add_adapter(HcpLoraConfig(target_modules=TARGETS, init_weights=False), adapter_name="style")
    full = unet_out(unet, unet_batch)
    layer = unet.get_submodule(TO_Q)
    x = torch.randn(2, layer.in_features)
    delta_full = layer(x) - layer.base_layer(x)
    unet.set_adapters(["style"], [0.5])
    torch.testing.assert_close(layer(x) - layer.base_layer(x), delta_full * 0.5, atol=1e-6, rtol=1e-5)
    unet.set_adapters(["style"], [1.0])
    unet.disable_adapters()
    assert torch.equal(unet_out(unet, unet_batch), base_out)
    unet.enable_adapters()
    assert torch.equal(unet_out(unet, unet_batch), full)
    unet.delete_adapters("style")
    assert torch.equal(unet_out(unet, unet_batch), base_out)


def test_text_encoder_lora(text_encoder, token_ids, tmp_path):
    with torch.no_grad():
        base = text_encoder(token_ids).last_hidden_state
    model = get_peft_model(
        text_encoder,
        HcpLoraConfig(target_modules=["re:.*self_attn\\.(q|k|v|out)_proj$", "re:.*mlp\\.fc\\d$"], init_weights=False),
    )
    assert len(model.base_model.targeted_module_names) == 12
    with torch.no_grad():
        adapted = model(input_ids=token_ids).last_hidden_state
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.save_pretrained(tmp_path)
    from peft_hcp.embedded import tiny_clip_text_model

    loaded = PeftModel.from_pretrained(tiny_clip_text_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=token_ids).last_hidden_state, adapted)


def test_load_under_a_second_adapter_name(unet, unet_batch, tmp_path):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, init_weights=False))
    trained = unet_out(model, unet_batch)
    model.save_pretrained(tmp_path)
    fresh = get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=TARGETS))
    base_out = unet_out(fresh, unet_batch)
    fresh.load_adapter(tmp_path, adapter_name="other")
    assert torch.equal(unet_out(fresh, unet_batch), base_out)  # "default" (a no-op) stays as it was
    fresh.set_adapter("other")
    assert torch.equal(unet_out(fresh, unet_batch), trained)


def test_modules_to_save_and_exclude_modules(unet, unet_batch, tmp_path):
    config = HcpLoraConfig(
        target_modules=["re:.*attn1$"], exclude_modules=["re:.*to_v"], modules_to_save=["conv_out"], init_weights=False
    )
    model = get_peft_model(unet, config)
    hosts = model.base_model.targeted_module_names
    assert hosts and not any(name.endswith("to_v") for name in hosts)
    assert any(p.requires_grad for n, p in model.named_parameters() if "conv_out.modules_to_save" in n)
    model.base_model.model.conv_out.modules_to_save["default"].weight.data.add_(0.5)
    expected = unet_out(model, unet_batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert torch.equal(unet_out(loaded, unet_batch), expected)


def test_inference_mode_freezes_adapters(unet):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())
