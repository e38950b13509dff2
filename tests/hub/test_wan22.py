"""Wan 2.2: a pipeline with two transformers (``transformer`` for the high-noise steps, ``transformer_2`` for the
low-noise ones). Files go into ``transformer_2`` as diffusers' ``load_lora_weights(file, load_into_transformer_2=True)``
puts them; adapter sets keep both transformers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import save_file

from peft_hcp import HcpLoraConfig
from peft_hcp.hub import attach, load_adapter, save_adapter
from peft_hcp.hub.interchange import export_kohya, import_kohya
from tests.interchange_hosts import tiny_wan, wan_inputs


def tiny_wan22_pipeline() -> WanPipeline:
    """Wan 2.2's text-to-video layout at toy size: two different transformers (no text encoder, VAE or tokenizer,
    which the transformers' LoRAs do not touch)."""
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_wan(0),
        transformer_2=tiny_wan(1),
        boundary_ratio=0.875,
    )


def _outputs(pipe: WanPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = wan_inputs()
    with torch.no_grad():
        return pipe.transformer(**inputs).sample, pipe.transformer_2(**inputs).sample


def _wan_lora_file(path) -> None:
    """A LoRA in Wan's original names (``diffusion_model.blocks.N.self_attn.q``), as Wan trainers write them."""
    g, state = torch.Generator().manual_seed(2), {}
    for layer, (out, inp) in {
        "blocks.0.self_attn.q": (16, 16),
        "blocks.1.cross_attn.o": (16, 16),
        "blocks.0.ffn.0": (32, 16),
    }.items():
        state[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.3
        state[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    save_file(state, str(path))


def test_a_file_goes_into_transformer_2_as_diffusers_puts_it(tmp_path):
    _wan_lora_file(tmp_path / "wan.safetensors")
    reference = tiny_wan22_pipeline()
    reference.load_lora_weights(str(tmp_path / "wan.safetensors"), load_into_transformer_2=True)
    expected = _outputs(reference)
    base = _outputs(tiny_wan22_pipeline())
    torch.testing.assert_close(expected[0], base[0], rtol=0, atol=0)  # diffusers left the first one alone
    assert (expected[1] - base[1]).abs().max() > 1e-3

    pipe = tiny_wan22_pipeline()
    placed = import_kohya(pipe, str(tmp_path / "wan.safetensors"), component="transformer_2")
    assert placed == {"transformer_2": ["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj", "blocks.1.attn2.to_out.0"]}
    assert not hasattr(pipe.transformer, "peft_config")
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    # the same file without component= goes into the first transformer, as diffusers' default does
    first = tiny_wan22_pipeline()
    import_kohya(first, str(tmp_path / "wan.safetensors"))
    reference = tiny_wan22_pipeline()
    reference.load_lora_weights(str(tmp_path / "wan.safetensors"))
    for ours, ref in zip(_outputs(first), _outputs(reference)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_component_transformer_2_is_refused_where_there_is_none(tmp_path):
    _wan_lora_file(tmp_path / "wan.safetensors")
    wan21 = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=tiny_wan(0))
    with pytest.raises(ValueError, match="has no transformer_2"):
        import_kohya(wan21, str(tmp_path / "wan.safetensors"), component="transformer_2")
    with pytest.raises(ValueError, match="only 'transformer_2'"):
        import_kohya(wan21, str(tmp_path / "wan.safetensors"), component="text_encoder")
    assert not hasattr(wan21.transformer, "peft_config")


def test_adapter_sets_keep_both_transformers(tmp_path):
    pipe = tiny_wan22_pipeline()
    attach(pipe.transformer, HcpLoraConfig(target_modules=["re:.*attn1\\.to_[qk]$"], r=2, init_weights=False), "high")
    attach(pipe.transformer_2, HcpLoraConfig(target_modules=["re:.*attn2\\.to_v$"], r=4, init_weights=False), "low")
    entries = save_adapter(pipe, str(tmp_path / "set"))
    assert [(e.component, e.subfolder) for e in entries] == [
        ("transformer", "transformer"),
        ("transformer_2", "transformer_2"),
    ]
    loaded = tiny_wan22_pipeline()
    load_adapter(loaded, str(tmp_path / "set"))
    base = _outputs(tiny_wan22_pipeline())
    for ours, ref, before in zip(_outputs(loaded), _outputs(pipe), base):
        assert (ref - before).abs().max() > 1e-4
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # diffusers loads one transformer per file: this set is for peft-hcp only
    assert not (tmp_path / "set" / "pytorch_lora_weights.safetensors").exists()


def test_export_kohya_points_transformer_2_to_the_comfyui_export(tmp_path):
    pipe = tiny_wan22_pipeline()
    attach(pipe.transformer_2, HcpLoraConfig(target_modules=["re:.*attn2\\.to_v$"], r=4, init_weights=False), "low")
    before = {k: v.clone() for k, v in pipe.transformer_2.state_dict().items()}
    with pytest.raises(ValueError, match=r"export_comfyui\(pipe, path, component='transformer_2'\)"):
        export_kohya(pipe, str(tmp_path / "wan.safetensors"))
    assert not (tmp_path / "wan.safetensors").exists()
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer_2.state_dict().items())


def test_cli_exports_each_transformer_of_a_wan22_set_to_its_comfyui_file(tmp_path):
    from safetensors.torch import load_file

    from peft_hcp.cli import main
    from peft_hcp.hub.interchange import export_comfyui

    pipe = tiny_wan22_pipeline()
    pipe.save_pretrained(str(tmp_path / "wan22"))
    attach(pipe.transformer, HcpLoraConfig(target_modules=["re:.*attn1\\.to_[qk]$"], r=2, init_weights=False), "high")
    attach(pipe.transformer_2, HcpLoraConfig(target_modules=["re:.*attn2\\.to_v$"], r=4, init_weights=False), "low")
    save_adapter(pipe, str(tmp_path / "set"))
    base = ["export", str(tmp_path / "set"), "--format", "comfyui", "--pretrained-model", str(tmp_path / "wan22")]
    for component in ("transformer", "transformer_2"):
        out = str(tmp_path / f"{component}.safetensors")
        assert main([*base, "--out", out, "--component", component]) == 0
        expected = export_comfyui(pipe, str(tmp_path / f"direct_{component}.safetensors"), component=component)
        written = load_file(out)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    assert "diffusion_model.blocks.0.cross_attn.v.lora_up.weight" in load_file(
        str(tmp_path / "transformer_2.safetensors")
    )
    kohya = ["export", str(tmp_path / "set"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]
    assert main([*kohya, "--component", "transformer_2"]) == 2
