"""A torch.compile'd adapted UNet runs and matches eager (CPU, tiny UNet)."""

import torch
from peft import get_peft_model

from peft_hcp import HcpLoraConfig
from tests.helpers import unet_out


def test_compiled_lora_unet_matches_eager(unet, unet_batch):
    model = get_peft_model(unet, HcpLoraConfig(target_modules=["re:.*attn.?$", "re:.*ff$", "conv_in"], init_weights=False))
    eager = unet_out(model, unet_batch)
    with model.disable_adapter():
        assert not torch.allclose(eager, unet_out(model, unet_batch), atol=1e-4)  # the adapters act
    compiled = torch.compile(model.base_model.model)
    with torch.no_grad():
        out = compiled(*unet_batch).sample
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
