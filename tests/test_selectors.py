"""The selector grammar, table-driven, against the tiny UNet's real module names."""

import pytest
from peft import get_peft_model

from peft_hcp import (
    HcpLoraConfig,
    SelectorMatchError,
    SelectorSyntaxError,
    parse_selector,
    parse_selectors,
    resolve,
)
from peft_hcp.selectors import selectable_modules


ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
ATTENTIONS = [
    "down_blocks.0.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "mid_block.attentions.0",
]
PROJ_IN = [f"{a}.proj_in" for a in ATTENTIONS]
PROJ_OUT = [f"{a}.proj_out" for a in ATTENTIONS]
ATTN1S = [f"{a}.transformer_blocks.0.attn1" for a in ATTENTIONS]


@pytest.mark.parametrize(
    ("selector", "expected_names", "prehook"),
    [
        ("", [""], False),
        ("conv_in", ["conv_in"], False),
        (f"{ATTN1}.to_q", [f"{ATTN1}.to_q"], False),
        # a plain name: PEFT's rule, the exact name and every name ending in '.name'
        ("proj_in", PROJ_IN, False),
        ("re:conv_in", ["conv_in"], False),  # one module only: a full-match regex
        # re: is a full match: '.*attn1' does not also pick attn1.to_q (HCP's re.match would)
        ("re:.*attn1", ATTN1S, False),
        ("re:.*attn1$", ATTN1S, False),
        ("prehook:re:.*proj_out$", PROJ_OUT, True),
        ("re:prehook:.*proj_out$", PROJ_OUT, True),
        ("pre_hook:conv_in", ["conv_in"], True),
        ("pre_hook:", [""], True),
    ],
)
def test_selector_resolves_in_model_order(unet, selector, expected_names, prehook):
    order = [name for name, _ in unet.named_modules()]
    targets = resolve(unet, [parse_selector(selector)])
    assert sorted(t.name for t in targets) == sorted(expected_names)
    assert [t.name for t in targets] == sorted((t.name for t in targets), key=order.index)
    assert all(t.prehook is prehook for t in targets)
    assert all(t.module is unet.get_submodule(t.name) for t in targets)


def test_overlapping_selectors_give_each_module_once(unet):
    targets = resolve(unet, parse_selectors(["re:.*attn1", f"{ATTN1}", "re:.*attn.$"]))
    names = [t.name for t in targets]
    assert len(names) == len(set(names)) == 8  # attn1 and attn2 of the four transformer blocks


def test_same_module_with_and_without_prehook_are_two_targets(unet):
    targets = resolve(unet, parse_selectors(["conv_in", "prehook:conv_in"]))
    assert [(t.name, t.prehook) for t in targets] == [("conv_in", False), ("conv_in", True)]


@pytest.mark.parametrize(
    ("spec", "count"),
    [
        ("all-linear", None),  # every nn.Linear, checked below
        (".*attn1\\.to_(q|k)", 8),  # PEFT: a lone string is a full-match regex
        (["to_q", "to_k"], 16),  # PEFT: a list of suffixes
    ],
)
def test_peft_target_module_forms(unet, spec, count):
    import torch.nn as nn

    names = [t.name for t in resolve(unet, parse_selectors(spec))]
    if count is None:
        count = sum(isinstance(m, nn.Linear) for m in unet.modules())
    assert len(names) == count


@pytest.mark.parametrize(
    ("host", "targets"),
    [
        ("tiny_flux", ["proj_out", "to_q", "norm.linear"]),  # top-level proj_out and every single block's
        ("tiny_sd3", ["proj_out", "to_add_out", "attn.to_k"]),
        ("tiny_sdxl_unet", ["proj_out", "to_q", "ff.net.2", "conv1"]),
    ],
)
def test_plain_names_select_what_peft_selects(host, targets):
    """A PEFT ``target_modules`` list picks the same layers here as in PEFT's own LoraConfig."""
    from peft import LoraConfig

    import tests.controlnet_hosts as hosts

    build = getattr(hosts, host)
    ours = get_peft_model(build(), HcpLoraConfig(target_modules=targets)).targeted_module_names
    peft = get_peft_model(build(), LoraConfig(target_modules=targets)).targeted_module_names
    assert sorted(ours) == sorted(peft) and len(ours) > len(targets)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("re:.*atn1$", r"'re:\.\*atn1\$' matched no module.*Did you mean.*attn1"),
        ("down_blocks.0.resnets.0.conv9", r"matched no module.*Did you mean.*down_blocks\.0\.resnets\.0\.conv"),
        ("re:nothing_like_this", "matched no module"),
    ],
)
def test_no_match_names_the_selector_and_suggests(unet, selector, message):
    with pytest.raises(SelectorMatchError, match=message):
        resolve(unet, [parse_selector(selector)])


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("posthook:conv_in", r"unknown flag 'posthook:'"),
        ("re:prehok:.*", r"unknown flag 'prehok:'"),
        ("re:(unclosed", "bad regular expression"),
        ("re:", "needs a pattern"),
        (3, "must be a string"),
    ],
)
def test_malformed_selectors_are_rejected(selector, message):
    with pytest.raises(SelectorSyntaxError, match=message):
        parse_selector(selector)


def test_errors_are_value_errors_like_peft():
    assert issubclass(SelectorSyntaxError, ValueError)
    assert issubclass(SelectorMatchError, ValueError)


def test_config_rejects_bad_selector_at_construction():
    with pytest.raises(SelectorSyntaxError, match="unknown flag"):
        HcpLoraConfig(target_modules=["bogus:to_q"])
    with pytest.raises(ValueError, match="prehook"):
        HcpLoraConfig(target_modules=["prehook:re:.*to_q"])


def test_adapter_internals_are_not_selectable(unet):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=["re:.*to_q$"]))
    names = [name for name, _ in selectable_modules(model.base_model.model)]
    assert any(name.endswith("to_q") for name in names)
    assert not any("base_layer" in name or "hcp_lora_blocks" in name for name in names)
    # a second regex that would match the wrapped layer's insides only picks the wrapper itself
    targets = resolve(model.base_model.model, [parse_selector("re:.*to_q.*")])
    assert all(t.name.endswith("to_q") for t in targets)
