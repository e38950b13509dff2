"""The from -> to plugin kind (PluginBlock) with the learned-skip example, on the tiny UNet and CLIP."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from peft_hcp import (
    HcpLoraConfig,
    HcpSkipConfig,
    MergeNotSupportedError,
    SelectorMatchError,
)
from peft_hcp.embedded import tiny_unet
from peft_hcp.hooked.block import PluginBlock
from tests.helpers import hook_count, unet_out


SKIP = dict(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"])


def skip_config(**kw):
    return HcpSkipConfig(**{**SKIP, "init_weights": False, **kw})


def test_attach_pairs_in_model_order_and_trains_only_the_plugin(unet, unet_batch):
    model = get_peft_model(unet, skip_config())
    blocks = unet.hcp_skip.blocks["default"]
    assert [b.from_name for b in blocks] == [n for n, _ in unet.named_modules() if n.endswith("proj_in")]
    assert [b.to_name for b in blocks] == [n for n, _ in unet.named_modules() if n.endswith("proj_out")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hcp_skip_blocks.default." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(*unet_batch).sample.square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_skip_adds_projection_of_from_input_to_to_input(unet, unet_batch):
    seen = {}
    unet.mid_block.attentions[0].proj_in.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    config = HcpSkipConfig(
        from_layer=["mid_block.attentions.0.proj_in"],
        to_layer=["prehook:mid_block.attentions.0.proj_out"],
        init_weights=False,
    )
    model = get_peft_model(unet, config)
    # registered after the plugin's hook: sees the changed input
    unet.mid_block.attentions[0].proj_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    with torch.no_grad():
        with model.disable_adapter():
            model(*unet_batch)
        y_base = seen["y"]
        model(*unet_batch)
    block = unet.hcp_skip.blocks["default"][0]
    torch.testing.assert_close(seen["y"], y_base + block.layer(seen["x"]), rtol=0, atol=1e-6)


def test_zero_init_is_a_noop(unet, unet_batch):
    base = unet_out(unet, unet_batch)
    model = get_peft_model(unet, HcpSkipConfig(**SKIP))
    assert torch.equal(unet_out(model, unet_batch), base)


def test_disable_delete_unload_are_bit_exact(unet, unet_batch):
    base = unet_out(unet, unet_batch)
    keys = list(unet.state_dict())
    hooks = hook_count(unet)
    model = get_peft_model(unet, skip_config())
    model.add_adapter("second", skip_config())
    assert hook_count(unet) == hooks + 2 * 8
    with model.disable_adapter():
        assert torch.equal(unet_out(model, unet_batch), base)
    adapted = unet_out(model, unet_batch)
    assert not torch.equal(adapted, base)
    model.delete_adapter("second")
    assert hook_count(unet) == hooks + 8
    assert torch.equal(unet_out(model, unet_batch), adapted)  # "default" untouched
    model.delete_adapter("default")
    assert hook_count(unet) == hooks and not hasattr(unet, "hcp_skip")
    assert list(unet.state_dict()) == keys
    assert torch.equal(unet_out(unet, unet_batch), base)

    model = get_peft_model(tiny_unet(), skip_config())
    plain = model.unload()
    assert hook_count(plain) == 0 and list(plain.state_dict()) == keys
    assert torch.equal(unet_out(plain, unet_batch), base)


def test_merge_is_refused_with_the_reason(unet):
    model = get_peft_model(unet, skip_config())
    with pytest.raises(MergeNotSupportedError, match="cross-layer"):
        model.merge_and_unload()
    with pytest.raises(MergeNotSupportedError, match="activations of other layers"):
        model.merge_adapter()


def test_deepcopy_rebinds_hooks_to_the_copy(unet, unet_batch):
    model = get_peft_model(unet, skip_config())
    out = unet_out(model, unet_batch)
    clone = copy.deepcopy(model)
    clone_unet = clone.get_base_model()
    hook = next(iter(clone_unet.mid_block.attentions[0].proj_out._forward_pre_hooks.values()))
    assert hook.func.__self__ is clone_unet.hcp_skip
    assert torch.equal(unet_out(clone, unet_batch), out)
    with torch.no_grad():
        for p in clone_unet.hcp_skip.parameters():
            p.mul_(3)
    assert not torch.equal(unet_out(clone, unet_batch), out)
    assert torch.equal(unet_out(model, unet_batch), out)


def test_gradient_checkpointing_gives_the_same_gradients(unet_batch):
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        model = get_peft_model(unet, skip_config())
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        model(*unet_batch).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_runs_inside_autocast(unet, unet_batch):
    model = get_peft_model(unet, skip_config())
    dtypes = []
    unet.hcp_skip.blocks["default"][0].layer.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*unet_batch)
    assert dtypes == [torch.bfloat16]


def test_loads_under_other_names(unet, unet_batch, tmp_path):
    model = get_peft_model(unet, skip_config())
    expected = unet_out(model, unet_batch)
    model.save_pretrained(tmp_path / "skip")  # loaded in a fresh process: tests/contract/test_matrix.py
    other = PeftModel.from_pretrained(tiny_unet(), tmp_path / "skip", adapter_name="first")
    other.load_adapter(tmp_path / "skip", adapter_name="again")
    other.set_adapter("again")
    assert torch.equal(unet_out(other, unet_batch), expected)
    other.delete_adapter("first")
    assert torch.equal(unet_out(other, unet_batch), expected)


def test_bad_inputs_are_clear_errors(unet):
    with pytest.raises(
        SelectorMatchError, match=r"(?s)matched 4 layer\(s\).*matched 1.*from: \[.*proj_in.*\n  to:   \['mid_block"
    ):
        get_peft_model(
            tiny_unet(), HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["mid_block.attentions.0.proj_out"])
        )
    with pytest.raises(SelectorMatchError, match="proj_outt"):
        get_peft_model(tiny_unet(), HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["re:.*proj_outt"]))
    with pytest.raises(ValueError, match="needs `from_layer`"):
        get_peft_model(tiny_unet(), HcpSkipConfig(to_layer=["conv_in"]))
    with pytest.raises(ValueError, match="unknown flag"):
        HcpSkipConfig(from_layer=["post:conv_in"], to_layer=["conv_out"])

    class FromOutput(PluginBlock):
        from_output = True

    from peft_hcp.hooked.layer import PluginLayer

    layer_cls = type(
        "L", (PluginLayer,), {"block_cls": FromOutput, "blocks_attr": "x_blocks", "adapter_layer_names": ("x_blocks",)}
    )
    with pytest.raises(ValueError, match="no output yet"):
        layer_cls().update_layer("a", HcpSkipConfig(from_layer=["prehook:conv_in"], to_layer=["conv_out"]), unet)


def test_to_layer_running_before_its_from_layer_is_reported(unet, unet_batch):
    model = get_peft_model(unet, HcpSkipConfig(from_layer=["conv_out"], to_layer=["conv_in"], init_weights=False))
    with pytest.raises(RuntimeError, match="'conv_in' ran before its from-layer 'conv_out'"):
        model(*unet_batch)


def test_on_the_clip_text_encoder(text_encoder, token_ids):
    with torch.no_grad():
        base = text_encoder(token_ids).last_hidden_state
    config = HcpSkipConfig(
        from_layer=[r"re:.*layers\.0\.mlp\.fc1"], to_layer=[r"re:.*layers\.1\.mlp\.fc2"], init_weights=False
    )
    model = get_peft_model(text_encoder, config)
    with torch.no_grad():
        assert not torch.equal(model(token_ids).last_hidden_state, base)
        with model.disable_adapter():
            assert torch.equal(model(token_ids).last_hidden_state, base)
    assert torch.equal(model.unload()(token_ids).last_hidden_state, base)


def test_in_place_next_to_a_lora(unet, unet_batch):
    base = unet_out(unet, unet_batch)
    unet.add_adapter(HcpLoraConfig(target_modules=[r"re:.*attn.?\.to_q"], init_weights=False), adapter_name="lora")
    lora_only = unet_out(unet, unet_batch)
    inject_adapter_in_model(skip_config(), unet, adapter_name="skip")
    both = unet_out(unet, unet_batch)
    assert not torch.equal(both, lora_only) and not torch.equal(lora_only, base)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert any("hcp_skip_blocks.skip." in n for n in trainable) and any("hcp_lora_blocks" in n for n in trainable)
    assert all("hcp_skip_blocks" in n or "hcp_lora_blocks" in n for n in trainable)
    unet.delete_adapters("skip")
    assert torch.equal(unet_out(unet, unet_batch), lora_only)
    assert not any(m._forward_pre_hooks for m in unet.modules())
