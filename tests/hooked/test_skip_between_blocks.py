"""From -> to plugins between whole blocks: the learned skip (``HcpSkipConfig.features``) as a long skip
between the tiny Flux transformer's blocks and between the tiny UNet's ResNets."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from peft import PeftModel, get_peft_model

from peft_hcp import HcpSkipConfig, UnsupportedLayerError
from peft_hcp.embedded.models import flux_inputs, tiny_flux, tiny_unet, unet_inputs
from peft_hcp.hooked.block import element, with_element
from tests.helpers import assert_model_unchanged, model_snapshot


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], object]
    config: dict

    def run(self, model) -> torch.Tensor:
        inputs = self.inputs()
        with torch.no_grad():
            return model(**inputs).sample if isinstance(inputs, dict) else model(*inputs).sample


CASES = {
    # Flux's blocks are called with keywords (hidden_states=...) and return (encoder_hidden_states, hidden_states)
    "flux_double_to_single": Case(
        tiny_flux,
        flux_inputs,
        dict(from_layer=["transformer_blocks.0"], to_layer=["single_transformer_blocks.3"], features=16, to_element=1),
    ),
    "flux_double_to_double": Case(
        tiny_flux,
        flux_inputs,
        dict(from_layer=["transformer_blocks.0"], to_layer=["transformer_blocks.2"], features=16, to_element=1),
    ),
    # ResNets take (hidden_states, temb) positionally and return a feature map (B, C, H, W)
    "unet_down_to_up_resnet": Case(
        tiny_unet,
        unet_inputs,
        dict(from_layer=["down_blocks.0.resnets.0"], to_layer=["up_blocks.1.resnets.1"], features=32),
    ),
    # widths differ on the two sides (32 channels in, 64 out, both at 8x8): features=[from_width, to_width]
    "unet_widening_resnet_skip": Case(
        tiny_unet,
        unet_inputs,
        dict(from_layer=["down_blocks.1.resnets.0"], to_layer=["up_blocks.0.resnets.0"], features=[32, 64]),
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def train(model, case: Case, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    inputs = case.inputs()
    for _ in range(steps):
        out = model(**inputs).sample if isinstance(inputs, dict) else model(*inputs).sample
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_noop_at_init_then_trains_only_the_skip(case):
    host = case.build()
    base = case.run(host)
    model = get_peft_model(host, HcpSkipConfig(**case.config))
    assert torch.equal(case.run(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hcp_skip_blocks.default." in n for n in trainable)
    train(model, case)
    assert not torch.allclose(case.run(model), base)
    with model.disable_adapter():
        assert torch.equal(case.run(model), base)


def test_save_and_load_round_trip(case, tmp_path):
    model = get_peft_model(case.build(), HcpSkipConfig(**case.config))
    train(model, case)
    trained = case.run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert loaded.peft_config["default"].features == case.config["features"]
    assert torch.equal(case.run(loaded), trained)


def test_unload_restores_the_base_bit_for_bit(case):
    host = case.build().requires_grad_(False)  # get_peft_model freezes the base, and unload (as PEFT's) keeps it so
    before = model_snapshot(host, case.run)
    model = get_peft_model(host, HcpSkipConfig(**case.config, init_weights=False))
    assert not torch.equal(case.run(model), before.output)
    assert model.unload() is host
    assert_model_unchanged(before, host)


def test_a_block_without_features_is_refused_and_the_model_unchanged(case):
    host = case.build()
    before = model_snapshot(host, case.run)
    config = {k: v for k, v in case.config.items() if k != "features"}
    src, dst = config["from_layer"][0], config["to_layer"][0]
    refusal = rf"from '{src}' to '{dst}': '{src}' is \w+, whose width.*`features`"
    with pytest.raises(UnsupportedLayerError, match=refusal):
        get_peft_model(host, HcpSkipConfig(**config))
    assert_model_unchanged(before, host)


def test_shapes_that_cannot_meet_fail_naming_both_layers_and_shapes():
    """``to_element=0`` points the skip at Flux's text tokens (2, 7, 16), which the image tokens cannot meet."""
    config = dict(CASES["flux_double_to_single"].config, to_element=0)
    model = get_peft_model(tiny_flux(), HcpSkipConfig(**config))
    with pytest.raises(
        ValueError,
        match=r"from 'transformer_blocks.0' \(2, 64, 16\) to 'single_transformer_blocks.3' \(2, 7, 16\): the skip "
        r"\(2, 64, 16\) does not fit.*`features`, `to_element`",
    ):
        CASES["flux_double_to_single"].run(model)
    model = get_peft_model(tiny_unet(), HcpSkipConfig(**dict(CASES["unet_down_to_up_resnet"].config, features=64)))
    with pytest.raises(ValueError, match=r"hidden states are 32 wide; the projection maps 64 to 64 features"):
        CASES["unet_down_to_up_resnet"].run(model)


def test_checkpointed_blocks_called_positionally_get_the_same_skip():
    """With gradient checkpointing Flux calls its blocks positionally: the skip reads and writes the same values."""
    case = CASES["flux_double_to_single"]
    model = get_peft_model(tiny_flux(), HcpSkipConfig(**case.config, init_weights=False))
    model.train()
    expected = case.run(model)
    model.get_base_model().enable_gradient_checkpointing()
    inputs = case.inputs()
    out = model(**inputs).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_element_reads_and_rebuilds_tensors_tuples_and_dataclasses():
    a, b = torch.zeros(1), torch.ones(1)
    assert element(a) is a and with_element(a, 0, b) is b
    assert element((a, b), 1) is b and with_element((a, a), 1, b) == (a, b)
    output = Transformer2DModelOutput(sample=a)
    assert element(output) is a
    rebuilt = with_element(output, 0, b)
    assert isinstance(rebuilt, Transformer2DModelOutput) and rebuilt.sample is b and output.sample is a
    with pytest.raises(IndexError, match="only tuples and dataclasses"):
        element(a, 1)
