"""The patch kind (PatchPluginBlock): containers that replace a module and run patches around it."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from peft_hcp import (
    HcpLoraConfig,
    HcpPatchConfig,
    HcpPReLUConfig,
    MergeNotSupportedError,
    PatchPluginBlock,
    PatchPluginContainer,
    UnsupportedLayerError,
    register_patch_plugin,
)
from peft_hcp.adapters.prelu import HcpPReLUContainer
from tests.helpers import unet_out


NONLIN = ["re:.*nonlinearity$"]
N_NONLIN = 8  # ResNet activations of the tiny UNet


class ScaleShiftPatch(PatchPluginBlock):
    """A chaining test patch: scales a convolution's input, shifts its output (a no-op at init)."""

    wrapable_classes = (nn.Conv2d,)

    def __init__(self, host, config):
        super().__init__(host, config)
        self.gain = nn.Parameter(torch.zeros(host.in_channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(host.out_channels, 1, 1))
        if not config.init_weights:
            nn.init.normal_(self.gain, std=0.5)
            nn.init.normal_(self.shift, std=0.5)

    def pre_forward(self, x):
        return (x * (1 + self.gain),), {}

    def post_forward(self, output, x):
        return output + self.shift


@register_patch_plugin("hcp_test_scaleshift", ScaleShiftPatch)
@dataclass
class ScaleShiftConfig(HcpPatchConfig):
    pass


def containers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PatchPluginContainer)}


def silu_to_prelu_reference(base, patched):
    """``base`` with every patched SiLU replaced by a plain nn.PReLU holding the patch's slope."""
    ref = copy.deepcopy(base)
    for name, container in containers(patched).items():
        name = name.removeprefix("base_model.model.")
        parent, _, attr = name.rpartition(".")
        prelu = nn.PReLU()
        prelu.weight.data.copy_(container.blocks["default"].act.weight)
        setattr(ref.get_submodule(parent), attr, prelu)
    return ref


def test_prelu_replaces_the_silus_exactly(unet, unet_batch):
    base = copy.deepcopy(unet)
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    found = containers(model)
    assert len(found) == N_NONLIN and all(n.endswith("nonlinearity") for n in found)
    assert all(isinstance(c.base_layer, nn.SiLU) for c in found.values())
    expected = unet_out(silu_to_prelu_reference(base, model), unet_batch)
    out = unet_out(model, unet_batch)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - unet_out(base, unet_batch)).abs().max() > 1e-3


def test_init_slope_is_p(unet):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, p=0.3))
    container = next(iter(containers(model).values()))
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(container(x), F.prelu(x, torch.tensor([0.3])))


def test_only_patch_weights_train(unet, unet_batch):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == N_NONLIN and all(".hcp_prelu_blocks.default.act.weight" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(*unet_batch).sample.square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_second_adapter_joins_the_container_and_outputs_sum(unet):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    first = containers(model)
    model.add_adapter("other", HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    second = containers(model)
    assert second.keys() == first.keys() and all(second[n] is first[n] for n in first)
    container = next(iter(second.values()))
    assert list(container.blocks) == ["default", "other"]
    x = torch.randn(5, 3)
    act_a, act_b = container.blocks["default"].act, container.blocks["other"].act
    assert torch.equal(container(x), act_a(x))
    model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(container(x), act_a(x) + act_b(x))  # several replacements: their sum
    model.base_model.set_adapter("other")
    assert torch.equal(container(x), act_b(x))


def test_delete_and_unload_put_the_original_modules_back(unet, unet_batch):
    originals = {n: m for n, m in unet.named_modules() if n.endswith("nonlinearity")}
    base_keys = set(unet.state_dict())
    base_out = unet_out(unet, unet_batch)
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    model.add_adapter("other", HcpPReLUConfig(target_modules=["down_blocks.0.resnets.0.nonlinearity"]))
    model.delete_adapter("default")
    assert list(containers(model)) == ["base_model.model.down_blocks.0.resnets.0.nonlinearity"]
    restored = unet.get_submodule("down_blocks.1.resnets.0.nonlinearity")
    assert restored is originals["down_blocks.1.resnets.0.nonlinearity"]
    model.delete_adapter("other")
    assert not containers(model)
    assert all(unet.get_submodule(n) is m for n, m in originals.items())
    assert set(unet.state_dict()) == base_keys
    assert torch.equal(unet_out(unet, unet_batch), base_out)

    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    unloaded = model.unload()
    assert all(unloaded.get_submodule(n) is m for n, m in originals.items())
    assert set(unloaded.state_dict()) == base_keys
    assert torch.equal(unet_out(unloaded, unet_batch), base_out)


def test_merge_is_refused_and_changes_nothing(unet, unet_batch):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    out = unet_out(model, unet_batch)
    with pytest.raises(MergeNotSupportedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(MergeNotSupportedError, match="replace the module"):
        model.merge_adapter()
    container = next(iter(containers(model).values()))
    with pytest.raises(MergeNotSupportedError, match="PReLUPatch cannot be merged"):
        container.merge()
    assert len(containers(model)) == N_NONLIN
    assert torch.equal(unet_out(model, unet_batch), out)


def test_wrong_target_class_is_a_clear_error(unet):
    with pytest.raises(UnsupportedLayerError, match=r"'conv_in'.*Conv2d.*SiLU"):
        get_peft_model(unet, HcpPReLUConfig(target_modules=["conv_in"]))
    with pytest.raises(UnsupportedLayerError, match="PReLUPatch attaches to SiLU modules, not Linear"):
        HcpPReLUContainer(nn.Linear(2, 2), "default", HcpPReLUConfig(target_modules=NONLIN))
    with pytest.raises(ValueError, match="prehook"):
        HcpPReLUConfig(target_modules=["prehook:conv_act"])
    with pytest.raises(ValueError, match="p must be a number"):
        HcpPReLUConfig(target_modules=NONLIN, p="big")


def test_saved_file_holds_one_slope_per_silu_and_names_its_type(unet, tmp_path):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")  # loaded in a fresh process: tests/contract/test_matrix.py
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == N_NONLIN and all(".hcp_prelu_blocks.act.weight" in k for k in saved)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HCP_PRELU" and config["target_modules"] == NONLIN


def test_load_under_a_second_name_goes_to_that_name(unet, tmp_path):
    from peft_hcp.embedded import tiny_unet

    trained = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    trained.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    model.load_adapter(tmp_path, adapter_name="copy")
    name = "down_blocks.0.resnets.0.nonlinearity"
    source = trained.base_model.model.get_submodule(name).blocks["default"].act.weight
    container = model.base_model.model.get_submodule(name)
    assert torch.equal(container.blocks["copy"].act.weight, source)
    assert torch.equal(container.blocks["default"].act.weight, source)


def test_deepcopy_is_independent(unet, unet_batch):
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    clone = copy.deepcopy(model)
    out = unet_out(model, unet_batch)
    assert torch.equal(unet_out(clone, unet_batch), out)
    name = "down_blocks.0.resnets.0.nonlinearity"
    clone_container = clone.base_model.model.get_submodule(name)
    assert clone_container is not model.base_model.model.get_submodule(name)
    with torch.no_grad():
        clone_container.blocks["default"].act.weight.fill_(5.0)
    assert torch.equal(unet_out(model, unet_batch), out)
    assert not torch.equal(unet_out(clone, unet_batch), out)


def _patch_grads(checkpointing, batch):
    from peft_hcp.embedded import tiny_unet

    unet = tiny_unet()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model = get_peft_model(unet, HcpPReLUConfig(target_modules=NONLIN, init_weights=False))
    model.train()
    calls = []
    container = model.base_model.model.get_submodule("down_blocks.0.resnets.0.nonlinearity")
    container.register_forward_hook(lambda *_: calls.append(1))
    model(*batch).sample.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(unet_batch):
    plain, plain_calls = _patch_grads(False, unet_batch)
    checkpointed, ckpt_calls = _patch_grads(True, unet_batch)
    assert ckpt_calls > plain_calls  # the patched block really was recomputed
    assert plain.keys() == checkpointed.keys() and len(plain) == N_NONLIN
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_chaining_container_runs_patches_around_the_module(unet):
    model = get_peft_model(unet, ScaleShiftConfig(target_modules=["conv_in"]))
    conv = unet.get_submodule("conv_in")
    assert isinstance(conv, PatchPluginContainer) and isinstance(conv.base_layer, nn.Conv2d)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(conv(x), conv.base_layer(x))  # identity at init
    model.add_adapter("b", ScaleShiftConfig(target_modules=["conv_in"], init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    a, b = conv.blocks["default"], conv.blocks["b"]
    with torch.no_grad():
        a.gain.normal_(std=0.5)
        a.shift.normal_(std=0.5)
        expected = conv.base_layer(x * (1 + a.gain) * (1 + b.gain)) + a.shift + b.shift
    torch.testing.assert_close(conv(x), expected)


def test_patch_next_to_a_lora_through_diffusers_add_adapter(unet, unet_batch):
    base_out = unet_out(unet, unet_batch)
    silus = {n: m for n, m in unet.named_modules() if n.endswith("nonlinearity")}
    unet.add_adapter(HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False), adapter_name="lora")
    lora_only = unet_out(unet, unet_batch)
    unet.add_adapter(HcpPReLUConfig(target_modules=NONLIN, init_weights=False), adapter_name="prelu")
    unet.set_adapters(["lora", "prelu"])
    both = unet_out(unet, unet_batch)
    unet.set_adapters(["prelu"])
    prelu_only = unet_out(unet, unet_batch)
    assert len({tuple(t.flatten()[:4].tolist()) for t in (base_out, lora_only, both, prelu_only)}) == 4
    unet.disable_adapters()
    assert torch.equal(unet_out(unet, unet_batch), base_out)
    unet.enable_adapters()
    unet.set_adapters(["lora", "prelu"])
    assert torch.equal(unet_out(unet, unet_batch), both)
    unet.delete_adapters("prelu")  # PEFT's functional delete: empty containers stay, forwarding to the SiLU
    assert not any("hcp_prelu" in k for k in unet.state_dict())
    assert all(not c.blocks and c.base_layer is silus[n] for n, c in containers(unet).items())
    unet.set_adapters(["lora"])
    assert torch.equal(unet_out(unet, unet_batch), lora_only)
    unet.unload_lora()  # diffusers unwraps every tuner layer: the original modules come back
    assert not containers(unet) and all(unet.get_submodule(n) is m for n, m in silus.items())
    assert torch.equal(unet_out(unet, unet_batch), base_out)


def test_patch_stacked_on_a_lora_layer(unet):
    """A patch on a layer that already carries a LoRA wraps the LoRA layer; both take effect, in order."""
    inject_adapter_in_model(HcpLoraConfig(target_modules=["conv_in"], init_weights=False), unet, adapter_name="lora")
    lora_layer = unet.get_submodule("conv_in")
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        lora_out = lora_layer(x)
    inject_adapter_in_model(ScaleShiftConfig(target_modules=["conv_in"], init_weights=False), unet, adapter_name="ss")
    container = unet.get_submodule("conv_in")
    assert isinstance(container, PatchPluginContainer) and container.base_layer is lora_layer
    patch = container.blocks["ss"]
    with torch.no_grad():
        torch.testing.assert_close(container(x), lora_layer(x * (1 + patch.gain)) + patch.shift)
        assert not torch.allclose(container(x), lora_out)
    assert isinstance(container, BaseTunerLayer)


def test_adapter_weights_on_patches(unet, unet_batch):
    unet.add_adapter(HcpPReLUConfig(target_modules=NONLIN, init_weights=False), adapter_name="prelu")
    out = unet_out(unet, unet_batch)
    with pytest.raises(ValueError, match="does not support adapter weights other than 1.0"):
        unet.set_adapters(["prelu"], [0.5])
    for container in containers(unet).values():
        container.scale_layer(0.5)  # a pipeline's LoRA scale: patches without supports_scaling ignore it
    assert torch.equal(unet_out(unet, unet_batch), out)
