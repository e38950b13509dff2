"""HCP-Diffusion's meaning of ``plugin_unet:`` / ``plugin_TE:`` entries: LoHa rank groups, model roots, frozen plugins."""

from __future__ import annotations

import pytest
import torch
import yaml

from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, unet_inputs
from peft_hcp.train import attach_plugins, parse_section
from peft_hcp.train.plugins import PluginConfigError
from tests.helpers import unet_out


ATTN1 = r"re:.*attn1$"


def _entries(text: str, section: str = "plugin_unet"):
    return parse_section(section, yaml.safe_load(text))


def test_loha_rank_is_split_over_rank_groups_as_hcp_does():
    """``rank: 8, rank_groups: 2`` is two pairs of rank 4, scaled by alpha / 8 (it gave two pairs of rank 8).

    HCP's ``LohaLayer`` (``hcpdiff/models/lora_layers.py``; hcpdiff 2.6 no longer imports it) has
    ``W_down (rank_groups, rank // rank_groups, in)``, ``W_up (rank_groups, out, rank // rank_groups)`` and
    the scale ``alpha / rank``."""
    unet = tiny_unet()
    entries = _entries(f"""
loha:
  _target_: LohaLayer
  _partial_: True
  lr: 1.0e-4
  rank: 8
  rank_groups: 2
  alpha: 4
  layers: ['{ATTN1}']
""")
    [group] = attach_plugins({"unet": unet}, entries)
    linears = [
        m.get_base_layer() for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v"))
    ]
    linears += [m.get_base_layer() for n, m in unet.named_modules() if n.endswith("attn1.to_out.0")]
    expected = sum(
        2 * 4 * (lin.in_features + lin.out_features) for lin in linears
    )  # HCP: W_down (2, 4, in), W_up (2, out, 4)
    assert sum(p.numel() for p in group["params"]) == expected
    block = next(iter(unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").blocks.values()))
    assert block.rank == 4 and block.scaling == pytest.approx(4 / 8)


def test_selectors_may_start_at_hcp_roots():
    unet, te = tiny_unet(), tiny_clip_text_model()
    entries = _entries(r"""
a:
  {_target_: LoraBlock, _partial_: True, lr: 1.0e-4, layers: ['re:denoiser\..*attn1$', 'denoiser.conv_in']}
""") + _entries(
        r"""
t:
  {_target_: LoraBlock, _partial_: True, lr: 1.0e-4, layers: ['re:TE\..*self_attn$']}
""",
        "plugin_TE",
    )
    attach_plugins({"unet": unet, "text_encoder": te}, entries)
    assert entries[0].config.target_modules == [r"re:.*attn1$", "re:conv_in"]
    wrapped = sorted(n for n, m in unet.named_modules() if hasattr(m, "blocks"))
    assert "conv_in" in wrapped and len(wrapped) == 1 + 4 * 4  # conv_in + 4 attn1 x (to_q, to_k, to_v, to_out.0)
    assert sum(hasattr(m, "blocks") for m in te.modules()) == 2 * 4  # 2 layers x (q, k, v, out)_proj


def test_frozen_plugin_and_per_plugin_weight_decay():
    unet = tiny_unet()
    entries = _entries(r"""
frozen:
  {_target_: LoraBlock, _partial_: True, train: false, init_weights: false, layers: ['re:.*attn1$']}
tuned:
  {_target_: LoraBlock, _partial_: True, lr: 1.0e-3, weight_decay: 0.1, layers: ['re:.*attn2$']}
""")
    groups = attach_plugins({"unet": unet}, entries)
    assert [g.get("weight_decay") for g in groups] == [None, 0.1]
    assert not any(p.requires_grad for p in groups[0]["params"]) and all(p.requires_grad for p in groups[1]["params"])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    frozen = [p.detach().clone() for p in groups[0]["params"]]
    unet_out(unet, unet_inputs())  # no grad: compute a loss with grad below
    unet.train()
    unet(*unet_inputs()).sample.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, groups[0]["params"]))
    with pytest.raises(PluginConfigError, match="weight_decay"):
        _entries("x: {_target_: LoraBlock, _partial_: True, lr: 1, weight_decay: -1, layers: ['re:.*attn1$']}")
    with pytest.raises(PluginConfigError, match="lr"):
        _entries("x: {_target_: LoraBlock, _partial_: True, layers: ['re:.*attn1$']}")
