"""Publishing through a loopback Hub with the real huggingface_hub client, and model cards."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_hcp
from peft_hcp import HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.hub import attach, load_adapter, push_adapter
from tests.helpers import pipe_out, run_python, tiny_pipeline, unet_out


def _adapted():
    pipe = tiny_pipeline()
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], r=2, init_weights=False), "lora")
    attach(pipe.unet, HcpLohaConfig(target_modules=["re:.*ff\\.net\\.2$"], init_weights=False), "loha")
    attach(pipe.text_encoder, HcpLoraConfig(target_modules=["re:.*self_attn$"], init_weights=False), "te")
    return pipe


def test_push_then_fresh_process_load(loopback_hub, tmp_path):
    pipe = _adapted()
    commit = push_adapter(
        pipe,
        "user/tiny-set",
        base_model="user/tiny-sd",
        license="apache-2.0",
        training={"steps": 10, "lr": 1e-4},
    )
    files = loopback_hub.repos["user/tiny-set"]
    assert {
        "README.md",
        "adapter_set.json",
        "unet/lora/adapter_model.safetensors",
        "unet/loha/adapter_config.json",
        "text_encoder/adapter_model.safetensors",
    } <= set(files)
    assert commit.oid == loopback_hub.heads["user/tiny-set"]
    torch.save(pipe_out(pipe), tmp_path / "want.pt")
    run_python(
        """
        import peft_hcp
        from tests.helpers import pipe_out, tiny_pipeline
        pipe = tiny_pipeline()
        peft_hcp.load_adapter(pipe, 'user/tiny-set')
        torch.save(pipe_out(pipe), sys.argv[1] + '/got.pt')
        """,
        str(tmp_path),
        env=dict(os.environ),
    )
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "want.pt"), rtol=0, atol=0)
    # the subprocess downloaded through the loopback server (not a local path)
    assert ("GET", f"/user/tiny-set/resolve/{commit.oid}/unet/loha/adapter_model.safetensors") in loopback_hub.requests


def test_model_card_renders_and_parses(loopback_hub, tmp_path):
    pipe = _adapted()
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n")
    push_adapter(
        pipe, "user/carded", base_model="user/tiny-sd", license="mit", training={"steps": 10}, sample_image=str(grid)
    )
    text = loopback_hub.repos["user/carded"]["README.md"].decode()
    card = ModelCard(text)
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "user/tiny-sd" and meta["license"] == "mit"
    assert meta["tags"][:3] == ["peft-hcp", "hcp_loha", "hcp_lora"] and "diffusers" in meta["tags"]
    assert ModelCardData(**meta).to_dict() == card.data.to_dict()
    assert "`re:.*attn.?$`" in text and "| `unet` | `lora` | `hcp_lora` |" in text and "| 2 |" in text
    assert "![samples](samples.png)" in text and "samples.png" in loopback_hub.repos["user/carded"]
    assert 'peft_hcp.load_adapter(pipe, "user/carded")' in text and "| steps | `10` |" in text


def test_push_to_existing_repo_updates_it(loopback_hub, tmp_path):
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn1$"], init_weights=False), "a")
    push_adapter(unet, "user/evolving")
    first = dict(loopback_hub.repos["user/evolving"])
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "hcp_lora" in name:
                param.add_(1.0)
    push_adapter(unet, "user/evolving", commit_message="second")
    assert loopback_hub.commits[-1]["message"] == "second"
    assert loopback_hub.repos["user/evolving"]["adapter_model.safetensors"] != first["adapter_model.safetensors"]
    fresh = tiny_unet()
    load_adapter(fresh, "user/evolving")
    batch = unet_inputs()
    torch.testing.assert_close(unet_out(fresh, batch), unet_out(unet, batch), rtol=0, atol=0)


def test_peft_own_push_to_hub_still_works(loopback_hub, tmp_path):
    model = get_peft_model(tiny_unet(), HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False))
    model.push_to_hub("user/plain-peft")
    assert "adapter_model.safetensors" in loopback_hub.repos["user/plain-peft"]
    loaded = PeftModel.from_pretrained(tiny_unet(), "user/plain-peft")
    batch = unet_inputs()
    torch.testing.assert_close(unet_out(loaded, batch), unet_out(model, batch), rtol=0, atol=0)


def test_wrong_token_and_missing_repo(loopback_hub, tmp_path, monkeypatch):
    with pytest.raises(RepositoryNotFoundError):
        load_adapter(tiny_unet(), "user/does-not-exist")
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn1$"]), "a")
    with pytest.raises(HfHubHTTPError, match="401|Invalid credentials"):
        push_adapter(unet, "user/denied", token="hf_wrong")
    assert "user/denied" not in loopback_hub.repos


def test_revision_is_passed_through(loopback_hub, tmp_path):
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn1$"], init_weights=False), "a")
    first = push_adapter(unet, "user/revs").oid
    batch = unet_inputs()
    want = unet_out(unet, batch)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "hcp_lora" in name:
                param.mul_(2.0)
    push_adapter(unet, "user/revs")
    old = tiny_unet()
    load_adapter(old, "user/revs", revision=first)
    torch.testing.assert_close(unet_out(old, batch), want, rtol=0, atol=0)
    assert peft_hcp.push_adapter is push_adapter


def _lora_only():
    """LoRAs of two ranks and alphas on the UNet (two adapters), one on the text encoder: what stock diffusers holds."""
    pipe = tiny_pipeline()
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], r=2, alpha=3.0, init_weights=False), "style")
    attach(
        pipe.unet, HcpLoraConfig(target_modules=["re:.*ff\\.net\\.2$"], r=4, alpha=1.0, init_weights=False), "detail"
    )
    attach(pipe.text_encoder, HcpLoraConfig(target_modules=["re:.*self_attn$"], r=2, init_weights=False), "te")
    return pipe


def _outputs(pipe, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "unet": pipe.unet(inputs["sample"], inputs["timestep"], inputs["text"]).sample,
            "text_encoder": pipe.text_encoder(inputs["tokens"]).last_hidden_state,
        }


def test_stock_diffusers_loads_a_pushed_lora_set_without_peft_hcp(loopback_hub, tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "base")
    pipe = _lora_only()
    sample, timestep, text = unet_inputs()
    inputs = {"sample": sample, "timestep": timestep, "text": text, "tokens": torch.randint(3, 1000, (2, 7))}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    want = _outputs(pipe, inputs)
    assert (want["unet"] - _outputs(tiny_pipeline(), inputs)["unet"]).abs().max() > 1e-3
    push_adapter(pipe, "user/lora-set", base_model="user/tiny-sd")
    files = loopback_hub.repos["user/lora-set"]
    assert "pytorch_lora_weights.safetensors" in files
    (tmp_path / "pushed.safetensors").write_bytes(files["pytorch_lora_weights.safetensors"])
    with safe_open(str(tmp_path / "pushed.safetensors"), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 2 and metadata["unet.lora_alpha"] == 3.0 and metadata["text_encoder.r"] == 2
    assert set(metadata["unet.rank_pattern"].values()) == {4} and set(metadata["unet.alpha_pattern"].values()) == {1.0}
    card = files["README.md"].decode()
    assert 'pipe.load_lora_weights("user/lora-set")' in card and 'peft_hcp.load_adapter(pipe, "user/lora-set")' in card

    run_python(
        """
        from diffusers import StableDiffusionPipeline
        from safetensors.torch import load_file, save_file
        pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1] + '/base')
        pipe.load_lora_weights('user/lora-set')
        inputs = load_file(sys.argv[1] + '/inputs.safetensors')
        with torch.no_grad():
            got = {
                'unet': pipe.unet(inputs['sample'], inputs['timestep'], inputs['text']).sample,
                'text_encoder': pipe.text_encoder(inputs['tokens']).last_hidden_state,
            }
        assert not any(name.startswith('peft_hcp') for name in sys.modules), 'peft_hcp was imported'
        save_file(got, sys.argv[1] + '/got.safetensors')
        """,
        str(tmp_path),
        env=dict(os.environ),
    )
    got = load_file(str(tmp_path / "got.safetensors"))
    for component in ("unet", "text_encoder"):
        torch.testing.assert_close(got[component], want[component], rtol=1e-5, atol=1e-5)

    loaded = tiny_pipeline()  # peft-hcp reads its own set, not the extra file
    load_adapter(loaded, "user/lora-set")
    for component, value in _outputs(loaded, inputs).items():
        torch.testing.assert_close(value, want[component], rtol=0, atol=0)


def test_a_set_stock_diffusers_cannot_load_says_so(tmp_path):
    from peft_hcp.hub import save_adapter
    from peft_hcp.hub.card import render_card

    save_adapter(_lora_only(), str(tmp_path / "set"))
    assert (tmp_path / "set" / "pytorch_lora_weights.safetensors").is_file()
    save_adapter(_adapted(), str(tmp_path / "set"))  # a LoHa among them: the earlier diffusers file goes
    assert not (tmp_path / "set" / "pytorch_lora_weights.safetensors").exists()
    text = str(render_card(str(tmp_path / "set"), peft_hcp.hub.read_set(str(tmp_path / "set")), "user/mixed"))
    assert "Stock diffusers cannot load this set" in text and "--format kohya" in text and "comfyui" in text
    assert "load_lora_weights(" not in text


def test_an_sdxl_set_is_saved_for_stock_diffusers_too(tmp_path):
    """Both SDXL text encoders and the UNet, ranks and alphas differing: stock ``load_lora_weights`` on the folder.

    (diffusers reads a text encoder's LoRA only when it has an attention projection among its layers: an MLP-only
    one is not written for it.)"""
    from peft_hcp.hub import save_adapter
    from tests.interchange_hosts import sdxl_latents, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn2\\.to_[kv]$"], r=2, alpha=1.0, init_weights=False), "a")
    attach(pipe.text_encoder, HcpLoraConfig(target_modules=["re:.*q_proj$"], r=2, init_weights=False), "te1")
    te2 = HcpLoraConfig(target_modules=["re:.*(k_proj|fc1)$"], r=4, alpha=8.0, init_weights=False)
    attach(pipe.text_encoder_2, te2, "te2")
    save_adapter(pipe, str(tmp_path / "set"))
    stock = tiny_sdxl_pipeline()
    stock.load_lora_weights(str(tmp_path / "set"))
    assert {c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(stock, c).peft_config} == {
        "unet",
        "text_encoder",
        "text_encoder_2",
    }
    want = sdxl_latents(pipe)
    assert (want - sdxl_latents(tiny_sdxl_pipeline())).abs().max() > 1e-3
    torch.testing.assert_close(sdxl_latents(stock), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_peft_hcp_never_reads_the_diffusers_file_of_a_set(tmp_path):
    """It is for stock diffusers: a broken one, or a link out of the set, changes nothing for ``load_adapter``."""
    from peft_hcp.hub import save_adapter

    pipe = _lora_only()
    save_adapter(pipe, str(tmp_path / "set"))
    inputs = {"sample": unet_inputs()[0], "timestep": unet_inputs()[1], "text": unet_inputs()[2]}
    inputs["tokens"] = torch.randint(3, 1000, (2, 7))
    want = _outputs(pipe, inputs)
    diffusers_file = tmp_path / "set" / "pytorch_lora_weights.safetensors"
    for broken in ("garbage", "link"):
        diffusers_file.unlink()
        if broken == "garbage":
            diffusers_file.write_bytes(b"\xff" * 64)
        else:
            (tmp_path / "elsewhere.safetensors").write_bytes(b"")
            diffusers_file.symlink_to(tmp_path / "elsewhere.safetensors")
        loaded = tiny_pipeline()
        load_adapter(loaded, str(tmp_path / "set"))
        for component, value in _outputs(loaded, inputs).items():
            torch.testing.assert_close(value, want[component], rtol=0, atol=0)
