"""Per-layer ``rank_pattern`` / ``alpha_pattern`` (PEFT's) on every low-rank variant, and LoKr's ``structure_pattern``:
the same shapes and outputs as PEFT's tuners with the same patterns, kept by saving and loading."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model

from peft_hcp import (
    HcpLohaConfig,
    HcpLokrConfig,
    HcpLoraConfig,
    hotswap_adapter,
    load_adapter,
    prepare_model_for_compiled_hotswap,
    save_adapter,
)
from peft_hcp.embedded import tiny_unet
from peft_hcp.hub import attach
from tests.helpers import unet_out


TARGETS = ["re:.*attn.?$", "re:.*ff$", "re:.*resnets\\.\\d+\\.conv\\d$", "re:.*conv_shortcut$"]
# a suffix, a regex anchored at the root, and a full name: PEFT's three forms of keys (the keys of one pattern
# match disjoint layers: PEFT saves a config with its keys sorted, and the first key that matches wins)
RANKS = {"to_q": 6, "^down_blocks\\.1\\..*conv\\d": 3, "mid_block.resnets.0.conv1": 1}
ALPHAS = {"to_v": 5.0, "^up_blocks\\.1\\.resnets\\..*": 0.5}


def _peft_params(layer) -> dict[str, torch.Tensor]:
    """A PEFT tuner layer's parameters of adapter ``default``, under peft-hcp's names."""
    names = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
    params = {}
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr)
        if "default" in holder:
            value = holder["default"]
            params[names.get(attr, attr)] = value.weight if isinstance(value, torch.nn.Module) else value
    return params


def _shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes; DoRA's magnitude by its size (PEFT keeps it flat, peft-hcp in LyCORIS's ``(out, 1)``)."""
    return {n: (p.numel(),) if n == "dora_scale" else tuple(p.shape) for n, p in params.items()}


# (ours, PEFT's, fields both take, fields only ours take)
VARIANTS = {
    "lora": (HcpLoraConfig, LoraConfig, {"r": 2}, {"alpha": 4.0}, {"lora_alpha": 4.0, "init_lora_weights": False}),
    "dora": (
        HcpLoraConfig,
        LoraConfig,
        {"r": 2, "use_dora": True},
        {"alpha": 4.0},
        {"lora_alpha": 4.0, "init_lora_weights": False},
    ),
    "loha": (HcpLohaConfig, LoHaConfig, {"r": 2, "alpha": 4.0}, {}, {"init_weights": False}),
    "lokr": (HcpLokrConfig, LoKrConfig, {"r": 2, "alpha": 4.0, "decompose_both": True}, {}, {"init_weights": False}),
}


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_patterns_match_peft(unet, unet_batch, kind):
    ours_cls, peft_cls, shared, ours_only, peft_only = VARIANTS[kind]
    patterns = {"rank_pattern": RANKS, "alpha_pattern": ALPHAS}
    reference = copy.deepcopy(unet)
    ours = get_peft_model(unet, ours_cls(target_modules=TARGETS, init_weights=False, **shared, **ours_only, **patterns))
    hosts = list(ours.base_model.targeted_module_names)
    reference = get_peft_model(reference, peft_cls(target_modules=hosts, **shared, **peft_only, **patterns))
    ranks = set()
    for name in hosts:
        layer = ours.base_model.model.get_submodule(name)
        block = getattr(layer, layer.blocks_attr)["default"]
        theirs = _peft_params(reference.base_model.model.get_submodule(name))
        mine = dict(block.named_parameters())
        assert _shapes(theirs) == _shapes(mine), name
        with torch.no_grad():
            for param_name, param in theirs.items():
                param.copy_(mine[param_name].reshape(param.shape))
        ranks.add(block.rank)
    assert ranks == {1, 2, 3, 6}  # every pattern took
    actual = unet_out(ours, unet_batch)
    with ours.disable_adapter():
        assert (actual - unet_out(ours, unet_batch)).abs().max() > 1e-3
    torch.testing.assert_close(actual, unet_out(reference, unet_batch), atol=1e-5, rtol=0)


def test_patterns_survive_save_and_load(unet, unet_batch, tmp_path):
    config = HcpLokrConfig(
        target_modules=TARGETS,
        init_weights=False,
        rank_pattern=RANKS,
        alpha_pattern=ALPHAS,
        structure_pattern={"conv_shortcut": {"full_matrix": True}, "to_k": {"decompose_both": True}},
    )
    model = get_peft_model(unet, config)
    out = unet_out(model, unet_batch)
    model.save_pretrained(str(tmp_path / "peft"))
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "peft"))
    for name in ("rank_pattern", "alpha_pattern", "structure_pattern"):
        assert getattr(loaded.peft_config["default"], name) == getattr(config, name)
    torch.testing.assert_close(unet_out(loaded, unet_batch), out, atol=0, rtol=0)

    pipeline_unet = tiny_unet()  # an adapter set, whose manifest is validated on load
    attach(pipeline_unet, HcpLoraConfig(target_modules=TARGETS, init_weights=False, rank_pattern=RANKS), "a")
    expected = unet_out(pipeline_unet, unet_batch)
    save_adapter(pipeline_unet, str(tmp_path / "set"))
    fresh = tiny_unet()
    load_adapter(fresh, str(tmp_path / "set"))
    assert fresh.peft_config["a"].rank_pattern == RANKS
    torch.testing.assert_close(unet_out(fresh, unet_batch), expected, atol=0, rtol=0)


def test_compiled_hotswap_keeps_each_layers_scale(unet, unet_batch, tmp_path):
    """Padding every block to one rank rewrites the patterns as alphas per layer name: the output, a save and load
    of the padded model, and a swap back of the original adapter (scales from its patterns) are all unchanged."""
    config = HcpLoraConfig(target_modules=TARGETS, init_weights=False, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    model = get_peft_model(unet, config)
    model.save_pretrained(str(tmp_path / "original"))
    out = unet_out(model, unet_batch)
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    prepared = model.peft_config["default"]
    assert (prepared.r, prepared.rank_pattern) == (8, {}) and prepared.alpha_pattern
    padded = unet_out(model, unet_batch)
    torch.testing.assert_close(padded, out, atol=1e-5, rtol=0)  # zero padding: rounding only
    model.save_pretrained(str(tmp_path / "padded"))
    reloaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "padded"))
    torch.testing.assert_close(unet_out(reloaded, unet_batch), padded, atol=0, rtol=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()
    hotswap_adapter(model, str(tmp_path / "original"), "default")
    torch.testing.assert_close(unet_out(model, unet_batch), padded, atol=0, rtol=0)


def test_structure_pattern_builds_each_layer_as_its_own_config(unet):
    """A layer a structure pattern matches is the block a config with those fields builds there."""
    overrides = {
        "to_q": {"decompose_both": True},
        "conv1": {"use_effective_conv2d": True},
        "to_out.0": {"full_matrix": True},
    }
    fields = {"r": 2, "alpha": 3.0, "init_weights": False}
    model = copy.deepcopy(unet)
    attach(model, HcpLokrConfig(target_modules=[""], structure_pattern=overrides, **fields), "a")
    forms = set()
    for key, override in overrides.items():
        alone = copy.deepcopy(unet)
        attach(alone, HcpLokrConfig(target_modules=[f"re:.*{key}$"], **fields, **override), "a")
        blocks = {n: m.hcp_lokr_blocks["a"] for n, m in alone.named_modules() if hasattr(m, "hcp_lokr_blocks")}
        assert blocks
        for name, block in blocks.items():
            mine = model.get_submodule(name).hcp_lokr_blocks["a"]
            assert {n: p.shape for n, p in mine.named_parameters()} == {n: p.shape for n, p in block.named_parameters()}
            assert mine.scaling == block.scaling
            forms.add(tuple(sorted(mine._parameters)))
    assert {("lokr_w1", "lokr_w2"), ("lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b")} <= forms
    full = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0").hcp_lokr_blocks["a"]
    assert full.scaling == 1.0  # LyCORIS's full_matrix: not scaled by alpha / r


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank_pattern": {"to_q": 0}}, r"rank_pattern\['to_q'\]: r must be at least 1"),
        ({"alpha_pattern": {"to_q": "big"}}, r"alpha_pattern\['to_q'\]: alpha must be a number"),
        ({"rank_pattern": {"to_q(": 2}}, r"rank_pattern\['to_q\('\]"),
        ({"rank_pattern": ["to_q"]}, "rank_pattern must be a dict"),
        ({"structure_pattern": {"to_q": {"decompose_bot": True}}}, r"structure_pattern\['to_q'\]: a dict of some of"),
        ({"structure_pattern": {"to_q": {"decompose_factor": 0}}}, "decompose_factor must be -1 or a positive int"),
        ({"structure_pattern": {"to_q": True}}, r"structure_pattern\['to_q'\]"),
    ],
)
def test_bad_patterns_are_refused_naming_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        HcpLokrConfig(target_modules=[""], **fields)


def test_a_pattern_key_picks_its_layer_and_no_layer_ending_in_its_name():
    from peft.utils.other import get_pattern_key

    from peft_hcp.single.lowrank import pattern_key

    names = ["proj_out", "single_transformer_blocks.0.proj_out", "blocks.0.attn.to_q"]
    keys = {name: pattern_key(name, names) for name in names}
    assert keys == {
        "proj_out": "^proj_out",
        "single_transformer_blocks.0.proj_out": "single_transformer_blocks.0.proj_out",
        "blocks.0.attn.to_q": "blocks.0.attn.to_q",
    }
    for name in names:  # as PEFT reads the keys, in any order
        for order in (list(keys.values()), sorted(keys.values()), sorted(keys.values(), reverse=True)):
            assert get_pattern_key(order, name) == keys[name]
