"""Every refused operation leaves the model exactly as it was (state, tree, trainability, hooks, outputs).

A refused attach of every registered type, through each attach route, is in ``tests/contract/test_matrix.py``;
here: a host the ControlNet refuses, and refused loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import PeftModel, get_peft_model
from torch import nn

import peft_hcp
from peft_hcp import (
    CheckpointError,
    HcpControlNetConfig,
    HcpLoraConfig,
    HcpSkipConfig,
)
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.hooked.block import MultiPluginBlock
from tests.helpers import assert_model_unchanged, model_snapshot


TARGETS = ["re:.*attn.?$", "re:.*ff$"]
COND = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module) -> torch.Tensor:
    """The model's output on a fixed batch (fed a condition where a ControlNet plugin needs one)."""
    needs_cond = any(isinstance(m, MultiPluginBlock) for m in model.modules())
    with torch.no_grad(), peft_hcp.feed(model, cond=COND) if needs_cond else torch.enable_grad():
        return model(*unet_inputs()).sample


HEAD = dict(conditioning_embedding_out_channels=[8, 16], init_weights=False)


def test_controlnet_on_a_refused_host_through_diffusers_add_adapter():
    unet = tiny_unet()
    unet.add_adapter(HcpLoraConfig(target_modules=["re:.*ff$"]), "lora")
    host_refused = tiny_unet()
    host_refused.time_embed_act = nn.SiLU()
    for model in (unet, host_refused):
        before = model_snapshot(model)
        with pytest.raises((ValueError, TypeError), match="time_embed_act|ControlNetPlugin"):
            model.add_adapter(HcpControlNetConfig(from_layers=["prehook:"]), "control")
        assert_model_unchanged(before, model)
    host_refused.time_embed_act = None
    host_refused.add_adapter(HcpControlNetConfig(**HEAD), "control")


# -- loading -----------------------------------------------------------------------------------


def unet_with(**change) -> nn.Module:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**tiny_unet().config, **change})


def test_wrong_shape_checkpoint_through_peft_load_adapter_leaves_no_adapter(tmp_path):
    get_peft_model(unet_with(block_out_channels=(16, 32)), HcpLoraConfig(target_modules=TARGETS)).save_pretrained(
        tmp_path / "narrow"
    )
    get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path / "fits")
    model = get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=TARGETS, init_weights=False))
    before = model_snapshot(model, run)
    with pytest.raises(CheckpointError, match="another shape"):
        model.load_adapter(str(tmp_path / "narrow"), adapter_name="x")
    assert_model_unchanged(before, model)
    assert list(model.peft_config) == ["default"]
    model.load_adapter(str(tmp_path / "fits"), adapter_name="x")
    assert list(model.peft_config) == ["default", "x"]


def test_wrong_shape_checkpoint_through_from_pretrained_leaves_the_base_model(tmp_path):
    get_peft_model(unet_with(block_out_channels=(16, 32)), HcpLoraConfig(target_modules=TARGETS)).save_pretrained(
        tmp_path
    )
    unet = tiny_unet()
    before = model_snapshot(unet, run)
    with pytest.raises(CheckpointError, match="another shape"):
        PeftModel.from_pretrained(unet, str(tmp_path))
    assert_model_unchanged(before, unet)


def test_checkpoint_for_another_architecture_through_adapter_set_attaches_nothing(tmp_path):
    other = unet_with(layers_per_block=2)
    other.add_adapter(HcpLoraConfig(target_modules=TARGETS), "lora")
    peft_hcp.save_adapter(other, str(tmp_path))
    unet = tiny_unet()
    unet.add_adapter(
        HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"], init_weights=False), "skip"
    )
    before = model_snapshot(unet, run)
    with pytest.raises(CheckpointError, match="missing"):
        peft_hcp.load_adapter(unet, str(tmp_path))
    assert_model_unchanged(before, unet)


def test_a_refused_load_into_a_loaded_adapter_keeps_it(tmp_path):
    get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=TARGETS, init_weights=False)).save_pretrained(
        tmp_path / "fits"
    )
    get_peft_model(unet_with(block_out_channels=(16, 32)), HcpLoraConfig(target_modules=TARGETS)).save_pretrained(
        tmp_path / "narrow"
    )
    model = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "fits"))
    before = model_snapshot(model, run)
    with pytest.raises(CheckpointError, match="another shape"):
        model.load_adapter(str(tmp_path / "narrow"), adapter_name="default")  # into the adapter it already holds
    assert_model_unchanged(before, model)
