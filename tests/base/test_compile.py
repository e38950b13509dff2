"""torch.compile of adapted UNets (CPU, tiny UNet): compiled matches eager, and a compiled model takes a new fed
condition or new adapter weights of the same shapes without recompiling. That every registered type traces
without a graph break, in training and in inference, is checked by ``tests/contract/test_matrix.py``."""

import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import peft_hcp
from peft_hcp import HcpControlNetConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_unet
from tests.helpers import unet_out


def lora() -> HcpLoraConfig:
    return HcpLoraConfig(target_modules=["re:.*attn.?$", "re:.*ff$", "conv_in"], init_weights=False)


def controlnet() -> HcpControlNetConfig:
    return HcpControlNetConfig(conditioning_embedding_out_channels=[8, 16], init_weights=False)


def cond_image(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run(model, batch, cond=None):
    """The model's output, fed ``cond`` when its plugins take one."""
    if cond is None:
        with torch.no_grad():
            return model(*batch).sample
    with peft_hcp.feed(model, cond=cond), torch.no_grad():
        return model(*batch).sample


def test_compiled_lora_unet_matches_eager(unet, unet_batch):
    model = get_peft_model(unet, lora())
    eager = unet_out(model, unet_batch)
    with model.disable_adapter():
        assert not torch.allclose(eager, unet_out(model, unet_batch), atol=1e-4)  # the adapters act
    compiled = torch.compile(model.base_model.model)
    torch.testing.assert_close(run(compiled, unet_batch), eager, atol=1e-5, rtol=1e-5)


def test_compiled_controlnet_takes_each_fed_condition_without_recompiling(unet_batch):
    model = get_peft_model(tiny_unet(), controlnet())
    compiled = torch.compile(model.base_model.model, backend="aot_eager")
    torch._dynamo.reset()
    for seed in (1, 2):  # the second call compiles once more: it finds the activation cache of the first filled
        run(compiled, unet_batch, cond_image(seed))
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = [run(compiled, unet_batch, cond_image(seed)) for seed in (3, 4)]
    for seed, out in zip((3, 4), outputs):
        torch.testing.assert_close(out, run(model, unet_batch, cond_image(seed)), atol=1e-5, rtol=1e-5)
    assert not torch.equal(*outputs)


def test_swapping_adapter_weights_into_a_compiled_model_does_not_recompile(unet_batch, tmp_path):
    model = get_peft_model(tiny_unet(), lora())
    compiled = torch.compile(model.base_model.model, backend="aot_eager")
    torch._dynamo.reset()
    before = run(compiled, unet_batch)
    other = get_peft_model(tiny_unet(), lora())
    with torch.no_grad():
        for param in other.parameters():
            if param.requires_grad:  # the adapter's: same shapes, other weights
                param.add_(0.05)
    other.save_pretrained(tmp_path)
    expected = run(other, unet_batch)
    set_peft_model_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = run(compiled, unet_batch)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
