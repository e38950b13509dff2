"""Every refused operation leaves the model exactly as it was (state, tree, trainability, hooks, outputs).

A refused attach of every registered type, through each attach route, is in ``tests/contract/test_matrix.py``;
here: a host the ControlNet refuses, and refused loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

import peft_hcp
from peft_hcp import (
    CheckpointError,
    HcpControlNetConfig,
    HcpLoraConfig,
    HcpSkipConfig,
)
from peft_hcp.adapters.controlnet_bridge import controlnet_config, import_controlnet, load_controlnet
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.hooked.block import MultiPluginBlock
from peft_hcp.hub.interchange import import_hcp, import_kohya
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
    with pytest.raises(CheckpointError, match=r"unexpected down_blocks\.0\.attentions\.1\."):
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


def test_a_refused_entry_of_an_adapter_set_takes_the_entries_before_it_back(tmp_path):
    """The set's first adapter fits, its second was saved from a narrower model: neither stays."""
    source = tiny_unet()
    for name in ("a", "b"):
        source.add_adapter(HcpLoraConfig(target_modules=TARGETS, init_weights=False), name)
    peft_hcp.save_adapter(source, str(tmp_path / "set"))
    narrow = unet_with(block_out_channels=(16, 32))
    narrow.add_adapter(HcpLoraConfig(target_modules=TARGETS), "b")
    peft_hcp.save_adapter(narrow, str(tmp_path / "narrow"))
    (tmp_path / "narrow" / "adapter_model.safetensors").replace(tmp_path / "set" / "b" / "adapter_model.safetensors")
    unet = tiny_unet()
    unet.add_adapter(HcpLoraConfig(target_modules=["re:.*ff$"], init_weights=False), "lora")
    before = model_snapshot(unet, run)
    with pytest.raises(CheckpointError, match=r"b/adapter_model\.safetensors does not fit .* 'b': of another shape"):
        peft_hcp.load_adapter(unet, str(tmp_path / "set"))
    assert_model_unchanged(before, unet)


def test_a_refused_merge_leaves_every_host_weight():
    """``conv_in`` (which has a bias) merges; the later ``to_q`` has no bias to take the LoRA's: refused."""
    config = HcpLoraConfig(target_modules=["conv_in", r"re:.*attn1\.to_q$"], lora_bias=True, init_weights=False)
    model = get_peft_model(tiny_unet(), config)
    before = model_snapshot(model, run)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="has a bias but its host has none"):
            merge()
        assert_model_unchanged(before, model)


def _kohya_layer(name: str, rows: int, columns: int) -> dict[str, torch.Tensor]:
    key = "lora_unet_" + name.replace(".", "_")
    g = torch.Generator().manual_seed(0)
    return {
        f"{key}.lora_down.weight": torch.randn(2, columns, generator=g),
        f"{key}.lora_up.weight": torch.randn(rows, 2),
    }


@pytest.mark.parametrize("layout", ["kohya", "hcp"])
def test_a_refused_import_leaves_the_model_as_it_was(tmp_path, layout):
    """The file's first layer fits; its last has the wrong shape, found after the adapter was attached."""
    first, last = (
        f"{block}.attentions.{i}.transformer_blocks.0.attn1.to_q"
        for block, i in [("down_blocks.0", 0), ("up_blocks.1", 1)]
    )
    tensors = {**_kohya_layer(first, 32, 32), **_kohya_layer(last, 64, 32)}
    if layout == "hcp":
        names = {"lora_unet_" + n.replace(".", "_"): n for n in (first, last)}
        parts = {"lora_down.weight": "layer.W_down", "lora_up.weight": "layer.W_up"}
        tensors = {f"denoiser.{names[k.split('.')[0]]}.___.{parts[k.split('.', 1)[1]]}": v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    unet = tiny_unet()
    unet.add_adapter(HcpLoraConfig(target_modules=["re:.*ff$"], init_weights=False), "lora")
    before = model_snapshot(unet, run)
    with pytest.raises(CheckpointError, match="Shape mismatch in layer .*up_blocks"):
        (import_kohya if layout == "kohya" else import_hcp)(unet, str(tmp_path / "lora.safetensors"), "imported")
    assert_model_unchanged(before, unet)


# -- ControlNets -------------------------------------------------------------------------------


def controlnet_for(**change) -> ControlNetModel:
    """A diffusers ControlNet made for the tiny UNet changed by ``change``, with random weights everywhere."""
    controlnet = ControlNetModel.from_unet(unet_with(**change), conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return controlnet


def test_load_controlnet_in_place_refuses_a_controlnet_of_another_unet_before_copying():
    """The documented in-place route (``add_adapter(controlnet_config(cn))`` + ``load_controlnet``) with a
    ControlNet whose text width differs: by its config, and (config relabelled) by its weights' shapes."""
    wide = controlnet_for(cross_attention_dim=64)
    relabelled = controlnet_for(cross_attention_dim=64)
    relabelled.register_to_config(cross_attention_dim=32)
    host = tiny_unet()
    host.add_adapter(controlnet_config(wide), "control")
    before = model_snapshot(host, run)
    with pytest.raises(CheckpointError, match="cross_attention_dim: ControlNet 64, plugin on this host 32"):
        load_controlnet(host, wide, "control")
    assert_model_unchanged(before, host)
    with pytest.raises(
        CheckpointError,
        match=r"The ControlNetModel does not fit ControlNetPlugin \(adapter 'control'\): of another shape "
        r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight: checkpoint \(32, 64\) vs model \(32, 32\)",
    ):
        load_controlnet(host, relabelled, "control")
    assert_model_unchanged(before, host)
    load_controlnet(host, controlnet_for(), "control")  # one made for this UNet loads


def test_import_controlnet_with_weights_of_another_shape_leaves_the_host_as_it_was():
    relabelled = controlnet_for(cross_attention_dim=64)
    relabelled.register_to_config(cross_attention_dim=32)
    host = tiny_unet()
    host.add_adapter(HcpLoraConfig(target_modules=["re:.*ff$"], init_weights=False), "lora")
    before = model_snapshot(host, run)
    with pytest.raises(CheckpointError, match="of another shape"):
        import_controlnet(host, relabelled)
    assert_model_unchanged(before, host)
