"""PEFT's merge / unload contract on the mergeable kinds: unload drops modules_to_save copies as PEFT does,
Conv2d-hosted layers report in/out features. (A safe merge of a broken adapter of every mergeable type is
refused all or nothing, in PEFT's words: ``tests/contract/test_matrix.py``.)"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import AuxiliaryTrainingWrapper

from peft_hcp import HcpLoraConfig
from peft_hcp.embedded import tiny_unet


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
