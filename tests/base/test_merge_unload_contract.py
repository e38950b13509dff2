"""PEFT's merge / unload contract on the mergeable kinds: safe_merge refuses all or nothing in PEFT's words,
unload drops modules_to_save copies as PEFT does, Conv2d-hosted layers report in/out features."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import AuxiliaryTrainingWrapper

from peft_hcp import HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_unet
from tests.helpers import assert_model_unchanged, model_snapshot, unet_out


TARGETS = ["re:.*attn.?$", "re:.*ff$", "conv_out"]
LAST = "conv_out"


def _broken(model, kind_prefix: str):
    """Put a NaN into the adapter of the *last* targeted layer only, so a partial merge would be visible."""
    layer = model.get_base_model().get_submodule(LAST)
    with torch.no_grad():
        next(p for n, p in layer.named_parameters() if kind_prefix in n).view(-1)[0] = float("nan")


def _peft_wording(unet_batch) -> str:
    model = get_peft_model(tiny_unet(), LoraConfig(target_modules=[LAST], init_lora_weights=False))
    with torch.no_grad():
        model.get_base_model().conv_out.lora_A["default"].weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError) as info:
        model.merge_adapter(safe_merge=True)
    return str(info.value)


@pytest.mark.parametrize("config_cls", [HcpLoraConfig, HcpLohaConfig])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_of_a_broken_adapter_merges_nothing_in_peft_words(config_cls, how, unet_batch):
    model = get_peft_model(tiny_unet(), config_cls(target_modules=TARGETS, init_weights=False))
    _broken(model, config_cls.type_name)
    before = model_snapshot(model, lambda m: unet_out(m, unet_batch))
    with pytest.raises(ValueError) as info:
        getattr(model, how)(safe_merge=True)
    assert str(info.value) == _peft_wording(unet_batch)
    assert_model_unchanged(before, model)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def _with_saved_module(config):
    model = get_peft_model(tiny_unet(), config)
    with torch.no_grad():  # train the copy a little
        for p in model.get_base_model().conv_out.modules_to_save["default"].parameters():
            p.add_(0.5)
    return model


@pytest.mark.parametrize("merge", [False, True])
def test_unload_with_modules_to_save_leaves_no_copies_as_peft_does(merge, unet_batch):
    ours = _with_saved_module(HcpLoraConfig(target_modules=["re:.*ff$"], modules_to_save=["conv_out"]))
    theirs = _with_saved_module(LoraConfig(target_modules=["ff.net.2"], modules_to_save=["conv_out"]))
    unloaded = [m.merge_and_unload() if merge else m.unload() for m in (ours, theirs)]
    for model in unloaded:
        assert not any(isinstance(m, AuxiliaryTrainingWrapper) for m in model.modules())
        assert model.state_dict().keys() == tiny_unet().state_dict().keys()
    assert torch.equal(unloaded[0].conv_out.weight, unloaded[1].conv_out.weight)
    assert not torch.equal(unloaded[0].conv_out.weight, tiny_unet().conv_out.weight)  # PEFT keeps the trained copy


def test_conv2d_hosted_layers_report_in_and_out_features():
    model = get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=["conv_in", "conv_out"]))
    base = model.get_base_model()
    assert (base.conv_in.in_features, base.conv_in.out_features) == (4, 32)
    assert (base.conv_out.in_features, base.conv_out.out_features) == (32, 4)
