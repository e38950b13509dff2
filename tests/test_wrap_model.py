"""wrap_model semantics: wrapable_classes under the selected layers, exclude_key / exclude_classes."""

import json
from dataclasses import dataclass

import pytest
import torch
from diffusers.models.attention_processor import Attention
from peft import PeftModel, get_peft_model
from torch import nn

from peft_hcp import (
    HcpLoraConfig,
    HcpPatchConfig,
    HcpPReLUConfig,
    PatchPluginBlock,
    PatchPluginContainer,
    PReLUPatch,
    UnsupportedLayerError,
    register_patch_plugin,
    wrap_model,
)
from peft_hcp.single.layer import SinglePluginLayer
from tests.helpers import unet_out


class GatedSiLUPatch(PatchPluginBlock):
    """A patch whose own submodules include an nn.SiLU: wrapping must never reach inside it."""

    wrapable_classes = (nn.SiLU,)

    def __init__(self, host, config):
        super().__init__(host, config)
        self.gate = nn.Sequential(nn.SiLU(), nn.Identity())
        self.mix = nn.Parameter(torch.zeros(()))

    def post_forward(self, output, x):
        return output + self.mix * self.gate(x)


@register_patch_plugin("hcp_test_gated_silu", GatedSiLUPatch)
@dataclass
class GatedSiLUConfig(HcpPatchConfig):
    pass


def names_of(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def hosts(model, layer_cls):
    """Names of the modules carrying a tuner layer of ``layer_cls`` (PeftModel prefix removed)."""
    return sorted(n.removeprefix("base_model.model.") for n in names_of(model, layer_cls))


def test_root_selector_patches_every_silu(unet):
    silus = names_of(unet, nn.SiLU)
    assert len(silus) == 10
    blocks = wrap_model(unet, HcpPReLUConfig(target_modules=[""]), adapter_name="act")
    assert sorted(blocks) == silus
    assert all(isinstance(b, PReLUPatch) and unet.get_submodule(n).blocks["act"] is b for n, b in blocks.items())


def test_selected_container_patches_only_inside_it(unet):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=["mid_block", "conv_act"]))
    assert hosts(model, PatchPluginContainer) == [
        "conv_act",
        "mid_block.resnets.0.nonlinearity",
        "mid_block.resnets.1.nonlinearity",
    ]


def test_exclude_key_skips_whole_subtrees(unet):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=[""], exclude_key="up_blocks"))
    assert not any(n.startswith("up_blocks") for n in hosts(model, PatchPluginContainer))
    assert len(hosts(model, PatchPluginContainer)) == 6
    # an anchored key matches only the block's own name: its children go with it all the same
    model = get_peft_model(
        unet.__class__.from_config(unet.config), HcpPReLUConfig(target_modules=[""], exclude_key=r"^mid_block$")
    )
    found = hosts(model, PatchPluginContainer)
    assert len(found) == 8 and not any(n.startswith("mid_block") for n in found)


def test_exclude_classes_by_name_qualified_name_or_class(unet):
    expected = ["conv_act", "time_embedding.act"]  # every other SiLU lives in a ResnetBlock2D
    for spec in (["ResnetBlock2D"], ["diffusers.models.resnet.ResnetBlock2D"]):
        model = get_peft_model(
            unet.__class__.from_config(unet.config), HcpPReLUConfig(target_modules=[""], exclude_classes=spec)
        )
        assert hosts(model, PatchPluginContainer) == expected
    from diffusers.models.resnet import ResnetBlock2D

    config = HcpPReLUConfig(target_modules=[""], exclude_classes=[ResnetBlock2D])
    assert config.exclude_classes == ["diffusers.models.resnet.ResnetBlock2D"]
    json.dumps(config.to_dict())  # stays JSON


def test_single_kind_honours_exclude_classes_and_key(unet):
    attn_layers = {
        f"{n}.{c}"
        for n, m in unet.named_modules()
        if isinstance(m, Attention)
        for c, sub in m.named_modules()
        if isinstance(sub, (nn.Linear, nn.Conv2d))
    }
    all_layers = set(names_of(unet, (nn.Linear, nn.Conv2d)))
    model = get_peft_model(unet, HcpLoraConfig(target_modules=[""], exclude_classes=["Attention"]))
    assert set(hosts(model, SinglePluginLayer)) == all_layers - attn_layers
    assert attn_layers  # the exclusion removed something
    model = get_peft_model(
        unet.__class__.from_config(unet.config),
        HcpLoraConfig(target_modules=["down_blocks"], exclude_key=r"\.resnets\."),
    )
    found = hosts(model, SinglePluginLayer)
    assert found and all(n.startswith("down_blocks") and ".resnets." not in n for n in found)


def test_wrapping_never_reaches_into_plugins(unet):
    blocks_a = wrap_model(unet, GatedSiLUConfig(target_modules=[""]), adapter_name="a")
    blocks_b = wrap_model(unet, GatedSiLUConfig(target_modules=[""]), adapter_name="b")
    assert sorted(blocks_a) == sorted(blocks_b) and len(blocks_a) == 10
    containers = [m for m in unet.modules() if isinstance(m, PatchPluginContainer)]
    assert len(containers) == 10 and all(list(c.blocks) == ["a", "b"] for c in containers)
    assert all(isinstance(b.gate[0], nn.SiLU) for b in blocks_b.values())  # the patches' own SiLUs stay plain

    lora_a = wrap_model(unet, HcpLoraConfig(target_modules=[""]), adapter_name="la")
    lora_b = wrap_model(unet, HcpLoraConfig(target_modules=[""]), adapter_name="lb")
    assert sorted(lora_a) == sorted(lora_b)  # LoRA's own lora_down/lora_up are not wrapped
    assert len(lora_a) == len([m for m in unet.modules() if isinstance(m, SinglePluginLayer)])


def test_nothing_left_to_wrap_is_a_clear_error(unet):
    with pytest.raises(UnsupportedLayerError, match=r"'mid_block'.*no SiLU inside"):
        get_peft_model(unet, HcpPReLUConfig(target_modules=["mid_block"], exclude_classes=["ResnetBlock2D"]))


def test_bad_exclusions_are_refused():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        HcpPReLUConfig(target_modules=[""], exclude_key="(")
    with pytest.raises(ValueError, match="exclude_classes takes classes or class names"):
        HcpLoraConfig(target_modules=[""], exclude_classes=[3])


def test_exclusions_survive_save_and_load(unet, unet_batch, tmp_path):
    from peft_hcp.embedded import tiny_unet

    config = HcpPReLUConfig(
        target_modules=[""], exclude_key="up_blocks", exclude_classes=["TimestepEmbedding"], init_weights=False
    )
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert hosts(loaded, PatchPluginContainer) == hosts(model, PatchPluginContainer)
    assert "time_embedding.act" not in hosts(loaded, PatchPluginContainer)
    assert torch.equal(unet_out(loaded, unet_batch), unet_out(model, unet_batch))
