"""The input feeder for every plugin kind: single-layer, patch and from -> to blocks take fed inputs the
way the many -> many kind (the ControlNets, ``tests/hooked/test_multi_plugin.py``) always has."""

import threading
from dataclasses import dataclass

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from torch import nn

import peft_hcp
from peft_hcp import (
    HcpPatchConfig,
    HcpPluginConfig,
    HcpSingleConfig,
    PatchPluginBlock,
    PluginBlock,
    SinglePluginBlock,
    register_patch_plugin,
    register_plugin,
    register_single_plugin,
)
from peft_hcp.base.feed import fed_plugins
from peft_hcp.base.feed import feed as base_feed
from peft_hcp.hooked import feed as hooked_feed


WIDTH = 8


class StyleShiftBlock(SinglePluginBlock):
    """Single-layer: adds a projection of the fed ``style`` vector to a Linear layer's output."""

    wrapable_classes = (nn.Linear,)
    input_keys = ("style",)

    def __init__(self, host, config):
        super().__init__(host, config)
        self.proj = nn.Linear(WIDTH, host.out_features)

    def forward(self, fea_in, fea_out):
        return fea_out + self.proj(self.require_input("style"))


@register_single_plugin("hcp_test_fed_shift", StyleShiftBlock)
@dataclass
class FedShiftConfig(HcpSingleConfig):
    pass


class StyleGainPatch(PatchPluginBlock):
    """Patch: scales an activation's output by ``1 + gain * style``."""

    wrapable_classes = (nn.GELU,)
    input_keys = ("style",)

    def __init__(self, host, config):
        super().__init__(host, config)
        self.gain = nn.Parameter(torch.full((WIDTH,), 0.5))

    def post_forward(self, output, x):
        return output * (1 + self.gain * self.require_input("style"))


@register_patch_plugin("hcp_test_fed_gain", StyleGainPatch)
@dataclass
class FedGainConfig(HcpPatchConfig):
    pass


class StyleSkipBlock(PluginBlock):
    """From -> to: adds the from-layer's input, weighted by the fed ``style``, to the to-layer's output."""

    input_keys = ("style",)

    def __init__(self, from_layer, to_layer, config):
        super().__init__(from_layer, to_layer, config)
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, fea_from, fea_in, fea_out):
        return fea_out + fea_from[0] * self.weight * self.require_input("style")


@register_plugin("hcp_test_fed_skip", StyleSkipBlock)
@dataclass
class FedSkipConfig(HcpPluginConfig):
    pass


CONFIGS = {
    "single": lambda: FedShiftConfig(target_modules=["0", "2"]),
    "patch": lambda: FedGainConfig(target_modules=["1"]),
    "from_to": lambda: FedSkipConfig(from_layer=["0"], to_layer=["2"]),
}


class MLP(nn.Module):
    """Layers named as an ``nn.Sequential`` would name them; an explicit forward, since a cross-layer
    plugin's container is a child of the model root (which ``nn.Sequential`` would call)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.Linear(WIDTH, WIDTH))
        self.add_module("1", nn.GELU())
        self.add_module("2", nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule("2")(self.get_submodule("1")(self.get_submodule("0")(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def styles() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, WIDTH, generator=generator), torch.randn(1, WIDTH, generator=generator)


def fed_out(model: nn.Module, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    with peft_hcp.feed(model, style=style), torch.no_grad():
        return model(x)


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return get_peft_model(mlp(), CONFIGS[request.param]())


def test_the_documented_import_paths_are_one_feeder():
    assert peft_hcp.feed is hooked_feed is base_feed


def test_output_depends_on_the_fed_value(model):
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(2))
    a, b = styles()
    out_a, out_b = fed_out(model, x, a), fed_out(model, x, b)
    assert not torch.equal(out_a, out_b)
    assert torch.equal(fed_out(model, x, a), out_a)
    with model.disable_adapter(), torch.no_grad():
        base = model(x)
    assert not torch.equal(out_a, base)


def test_fed_value_gets_gradients(model):
    """A fed tensor is part of the graph: the loss reaches it (a condition encoder upstream trains)."""
    style = styles()[0].requires_grad_()
    with peft_hcp.feed(model, style=style):
        model(torch.randn(3, WIDTH)).square().sum().backward()
    assert style.grad is not None and style.grad.abs().sum() > 0


def test_a_call_without_the_input_names_it_and_the_feeder(model):
    with pytest.raises(ValueError, match=r"needs the input 'style'.*peft_hcp.feed\(model, style=\.\.\.\)"):
        model(torch.randn(3, WIDTH))


def test_feed_checks_keys_for_every_kind(model):
    with (
        pytest.raises(ValueError, match=r"no plugin takes \['colour'\]; the plugins here take \['style'\]"),
        peft_hcp.feed(model, style=styles()[0], colour=1),
    ):
        pass
    with pytest.raises(ValueError, match=r"adapter 'default'\) needs \['style'\] as well"), peft_hcp.feed(model):
        pass


def test_kinds_on_one_model_share_a_key():
    model = mlp()
    for kind in sorted(CONFIGS):
        inject_adapter_in_model(CONFIGS[kind](), model, adapter_name=f"fed_{kind}")
    x = torch.randn(3, WIDTH)
    a, b = styles()
    assert not torch.equal(fed_out(model, x, a), fed_out(model, x, b))
    fed = sorted(type(block).__name__ for block in fed_plugins(model))
    assert fed == ["StyleGainPatch", "StyleShiftBlock", "StyleShiftBlock", "StyleSkipBlock"]


def test_two_threads_with_different_values_stay_isolated(model):
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(3))
    values = styles()
    references = [fed_out(model, x, style) for style in values]
    start = threading.Barrier(len(values))
    results: dict[int, list[torch.Tensor]] = {}

    def worker(index: int) -> None:
        start.wait()
        results[index] = [fed_out(model, x, values[index]) for _ in range(50)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(values))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, reference in enumerate(references):
        assert len(results[index]) == 50
        assert all(torch.equal(out, reference) for out in results[index]), f"thread {index} got another call's value"
