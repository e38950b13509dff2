"""Several plugin kinds on one UNet (issue 3, item 5): LoRA on attention + ControlNet + PReLU patch.

PEFT's ``PeftModel`` holds one type, so the kinds live in place, each under its own adapter name
(:func:`peft_hcp.hub.attach`); they train together, and one ``save_adapter`` / one ``load_adapter``
brings the whole set back, here in a fresh process.
"""

from __future__ import annotations

import torch

import peft_hcp
from peft_hcp import HcpControlNetConfig, HcpLoraConfig, HcpPReLUConfig
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.hub import attach, load_adapter, read_set, save_adapter
from tests.helpers import run_python


COND = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _mixed_unet():
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn.?$"]), "lora")
    attach(unet, HcpControlNetConfig(conditioning_embedding_out_channels=[8, 16]), "control")
    attach(unet, HcpPReLUConfig(target_modules=["re:.*nonlinearity$"]), "prelu")
    return unet


def _out(unet, batch=None):
    with peft_hcp.feed(unet, cond=COND), torch.no_grad():
        return unet(*(batch or unet_inputs())).sample


def _train(unet, steps=2):
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    sample, timestep, text = unet_inputs()
    for _ in range(steps):
        with peft_hcp.feed(unet, cond=COND):
            loss = unet(sample, timestep, text).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_three_kinds_train_together_and_round_trip(tmp_path):
    unet = _mixed_unet()
    assert sorted(unet.peft_config) == ["control", "lora", "prelu"]
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    kinds = {prefix: [n for n in trainable if prefix in n] for prefix in ("hcp_lora_", "hcp_controlnet_", "hcp_prelu_")}
    assert all(kinds.values()), kinds  # each kind has trainable weights ...
    assert sum(map(len, kinds.values())) == len(trainable)  # ... and nothing else trains
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    _train(unet)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert all(any(n in changed for n in names) for names in kinds.values())  # every kind moved
    want = _out(unet)

    entries = save_adapter(unet, str(tmp_path / "set"))
    assert sorted((e.name, e.subfolder, e.peft_type) for e in entries) == [
        ("control", "control", "HCP_CONTROLNET"),
        ("lora", "lora", "HCP_LORA"),
        ("prelu", "prelu", "HCP_PRELU"),
    ]
    assert len(read_set(str(tmp_path / "set"))) == 3

    fresh = tiny_unet()
    load_adapter(fresh, str(tmp_path / "set"))
    torch.testing.assert_close(_out(fresh), want, rtol=0, atol=0)

    torch.save(want, tmp_path / "want.pt")
    run_python(
        """
        import peft_hcp
        from peft_hcp.embedded import tiny_unet
        from tests.hub.test_hub_mixed_kinds import _out
        unet = tiny_unet()
        peft_hcp.load_adapter(unet, sys.argv[1] + '/set')
        torch.save(_out(unet), sys.argv[1] + '/got.pt')
        """,
        str(tmp_path),
    )
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), want, rtol=0, atol=0)


def test_mixed_set_controls(tmp_path):
    unet = _mixed_unet()
    with torch.no_grad():
        plain = tiny_unet()(*unet_inputs()).sample
    _train(unet, steps=1)
    save_adapter(unet, str(tmp_path / "set"))
    fresh = tiny_unet()
    load_adapter(fresh, str(tmp_path / "set"), adapter_name={"lora": "style"})
    assert sorted(fresh.peft_config) == ["control", "prelu", "style"]
    full = _out(fresh)
    fresh.disable_adapters()
    torch.testing.assert_close(_out(fresh), plain, rtol=0, atol=0)
    fresh.enable_adapters()
    torch.testing.assert_close(_out(fresh), full, rtol=0, atol=0)
    fresh.set_adapters(["control", "prelu"])  # LoRA off: the output moves
    assert (_out(fresh) - full).abs().max() > 1e-6
