"""Adapter sets: several plugin kinds on one pipeline, saved once and loaded once (also in a fresh process)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel

from peft_hcp import CheckpointError, HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import tiny_clip_text_model, tiny_unet, unet_inputs
from peft_hcp.hub import attach, load_adapter, read_set, save_adapter
from tests.helpers import pipe_out, run_python, tiny_pipeline, unet_out


def _adapt(pipe) -> None:
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False), "lora")
    attach(pipe.unet, HcpLohaConfig(target_modules=["re:.*ff\\.net\\.2$"], init_weights=False), "loha")
    attach(pipe.text_encoder, HcpLoraConfig(target_modules=["re:.*self_attn$"], init_weights=False), "te")


@pytest.fixture
def adapted(tmp_path):
    pipe = tiny_pipeline()
    base = pipe_out(pipe)
    _adapt(pipe)
    return pipe, base


def test_layout_and_manifest(adapted, tmp_path):
    pipe, _ = adapted
    entries = save_adapter(pipe, str(tmp_path / "set"))
    assert [(e.component, e.name, e.subfolder, e.peft_type) for e in entries] == [
        ("unet", "lora", "unet/lora", "HCP_LORA"),
        ("unet", "loha", "unet/loha", "HCP_LOHA"),
        ("text_encoder", "te", "text_encoder", "HCP_LORA"),
    ]
    manifest = json.loads((tmp_path / "set" / "adapter_set.json").read_text())
    assert manifest["format"] == "peft-hcp-adapter-set" and len(manifest["adapters"]) == 3
    # without the manifest the folders alone describe the set (names come from subfolders)
    os.remove(tmp_path / "set" / "adapter_set.json")
    found = {(e.component, e.name, e.subfolder) for e in read_set(str(tmp_path / "set"))}
    assert found == {
        ("unet", "lora", "unet/lora"),
        ("unet", "loha", "unet/loha"),
        ("text_encoder", "default", "text_encoder"),
    }


def test_set_round_trip_in_process(adapted, tmp_path):
    pipe, base = adapted
    out = pipe_out(pipe)
    assert (out - base).abs().max() > 1e-3
    save_adapter(pipe, str(tmp_path / "set"))
    fresh = tiny_pipeline()
    loaded = load_adapter(fresh, str(tmp_path / "set"))
    assert sorted(e.name for e in loaded) == ["loha", "lora", "te"]
    assert fresh.get_list_adapters() == {"unet": ["lora", "loha"], "text_encoder": ["te"]}
    torch.testing.assert_close(pipe_out(fresh), out, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in fresh.unet.named_parameters())  # loaded for inference


def test_pipeline_controls_mix_disable_delete(adapted, tmp_path):
    pipe, base = adapted
    save_adapter(pipe, str(tmp_path / "set"))
    fresh = tiny_pipeline()
    load_adapter(fresh, str(tmp_path / "set"))
    full = pipe_out(fresh)
    fresh.set_adapters(["lora", "loha", "te"], [0.0, 0.0, 0.0])
    torch.testing.assert_close(pipe_out(fresh), base, rtol=0, atol=0)
    fresh.set_adapters(["lora", "loha", "te"], [0.5, 1.0, 1.0])
    half = pipe_out(fresh)
    assert (half - full).abs().max() > 1e-4 and (half - base).abs().max() > 1e-4
    fresh.set_adapters(["lora", "loha", "te"])
    torch.testing.assert_close(pipe_out(fresh), full, rtol=0, atol=0)
    fresh.disable_lora()
    torch.testing.assert_close(pipe_out(fresh), base, rtol=0, atol=0)
    fresh.enable_lora()
    fresh.delete_adapters(["lora", "loha", "te"])
    torch.testing.assert_close(pipe_out(fresh), base, rtol=0, atol=0)
    # diffusers deletes as PEFT does: the adapter weights go, the (now empty) wrappers stay
    assert not [k for k in fresh.unet.state_dict() if "hcp_" in k]
    assert not [k for k in fresh.text_encoder.state_dict() if "hcp_" in k]


def test_each_subfolder_loads_with_plain_peft(tmp_path):
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False), "only")
    batch = unet_inputs()
    want = unet_out(unet, batch)
    save_adapter(unet, str(tmp_path / "set"))
    assert (tmp_path / "set" / "adapter_config.json").is_file()  # one adapter on a bare model: the root
    model = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "set"))
    torch.testing.assert_close(unet_out(model, batch), want, rtol=0, atol=0)
    # and a PeftModel saves and loads as a set too
    save_adapter(model, str(tmp_path / "from_peft"))
    again = tiny_unet()
    load_adapter(again, str(tmp_path / "from_peft"), adapter_name="renamed")
    assert list(again.peft_config) == ["renamed"]
    torch.testing.assert_close(unet_out(again, batch), want, rtol=0, atol=0)


def test_fresh_process_load(adapted, tmp_path):
    pipe, _ = adapted
    save_adapter(pipe, str(tmp_path / "set"))
    torch.save(pipe_out(pipe), tmp_path / "want.pt")
    run_python(
        """
        import peft_hcp
        from tests.helpers import pipe_out, tiny_pipeline
        pipe = tiny_pipeline()
        peft_hcp.load_adapter(pipe, sys.argv[1] + '/set')
        torch.save(pipe_out(pipe), sys.argv[1] + '/got.pt')
        """,
        str(tmp_path),
    )
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "want.pt"), rtol=0, atol=0)


def test_bad_inputs(adapted, tmp_path):
    pipe, _ = adapted
    save_adapter(pipe, str(tmp_path / "set"))
    with pytest.raises(ValueError, match="several adapter names"):
        load_adapter(tiny_pipeline(), str(tmp_path / "set"), adapter_name="x")
    with pytest.raises(ValueError, match="components"):
        load_adapter(tiny_unet(), str(tmp_path / "set"))
    with pytest.raises(ValueError, match="no adapters"):
        save_adapter(tiny_clip_text_model(), str(tmp_path / "empty"))
    again = tiny_pipeline()
    load_adapter(again, str(tmp_path / "set"))
    with pytest.raises(ValueError, match="already has an adapter named 'lora'"):
        load_adapter(again, str(tmp_path / "set"))
    # an unregistered type names the fix
    cfg = tmp_path / "set" / "text_encoder" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"HCP_LORA"', '"HCP_NOPE"'))
    with pytest.raises(CheckpointError, match="not registered"):
        load_adapter(tiny_pipeline(), str(tmp_path / "set"), adapter_name={"lora": "a", "loha": "b"})
    # a pickle instead of safetensors is refused
    weights = tmp_path / "set" / "unet" / "lora" / "adapter_model.safetensors"
    weights.rename(weights.with_name("adapter_model.bin"))
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapter(tiny_pipeline(), str(tmp_path / "set"))
