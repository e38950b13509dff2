"""ComfyUI-layout files for DiTs, both ways: checked against ComfyUI's key maps and patch math
(:mod:`tests.comfyui_keymaps`), diffusers' converters where it has one, and a round trip through ``import_kohya``."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin, QwenImageLoraLoaderMixin, WanLoraLoaderMixin
from safetensors.torch import load_file, save_file
from torch import nn

from peft_hcp import CheckpointError, HcpLohaConfig, HcpLokrConfig, HcpLoraConfig
from peft_hcp.embedded.models import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import export_comfyui, export_kohya, import_kohya
from tests.comfyui_keymaps import apply_as_comfyui, file_layers, flux_targets, mmdit_targets, wan_targets
from tests.helpers import pipe_out, tiny_pipeline
from tests.interchange_hosts import qwen_image_inputs, tiny_qwen_image, tiny_wan, wan_inputs


FAMILIES = {
    "flux": (tiny_flux, flux_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    "sd35": (lambda: tiny_sd35(), sd3_inputs),
    "wan": (tiny_wan, wan_inputs),
    "wan_i2v": (lambda: tiny_wan(image_dim=8), lambda: wan_inputs(image_dim=8)),
    "qwen": (tiny_qwen_image, qwen_image_inputs),
}
#: diffusers' module names ComfyUI's layouts fuse (only a LoRA fuses) or store as (scale, shift)
_FUSED = r"(attn2?\.(to_[qkv]|add_[qkv]_proj)|proj_mlp)$"
_SWAPPED = r"(norm_out\.linear|transformer_blocks\.3\.norm1_context\.linear)$"


def tiny_sd35() -> nn.Module:
    """SD3.5's MMDiT-X: the tiny SD3 with a second attention (``attn2``) in its first two blocks."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_config({**tiny_sd3().config, "dual_attention_layers": (0, 1)}).eval()


def _layers(model: nn.Module, skip: str = "^$") -> list[str]:
    import re

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not re.search(skip, name)
    ]


def _out(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).sample


def _adapted(family: str, config_cls=HcpLoraConfig, skip: str = "^$", **kwargs) -> nn.Module:
    build, _ = FAMILIES[family]
    model = build()
    kwargs = {"r": 2, "alpha": 3.0, **kwargs}
    attach(model, config_cls(target_modules=_layers(model, skip), init_weights=False, **kwargs), "style")
    return model


def _comfyui_targets(family: str, model: nn.Module, path: str) -> dict:
    if family == "flux":
        return flux_targets(model)
    if family.startswith("sd3"):
        return mmdit_targets(model)
    layers = sorted(file_layers(path))
    if family.startswith("wan"):
        return wan_targets(model, layers)
    return {layer: (layer, 0, None, False) for layer in layers}  # Qwen-Image: ComfyUI's model has diffusers' names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_export_is_what_comfyui_applies_and_imports_back(family, tmp_path):
    """Every Linear/Conv2d adapted: ComfyUI's key map names every file layer, its patch gives our outputs, and
    ``import_kohya`` reads the file back to the same outputs."""
    build, inputs = FAMILIES[family]
    model = _adapted(family)
    expected = _out(model, inputs)
    path = str(tmp_path / "comfy.safetensors")
    tensors = export_comfyui(model, path)
    assert all(k.startswith("diffusion_model.") for k in tensors)
    comfy = build()
    apply_as_comfyui(comfy, path, _comfyui_targets(family, comfy, path))
    assert (_out(build(), inputs) - expected).abs().max() > 1e-2
    torch.testing.assert_close(_out(comfy, inputs), expected, rtol=1e-5, atol=1e-5)
    back = build()
    placed = import_kohya(back, path)
    assert placed == {"transformer": sorted(_layers(build()))}
    torch.testing.assert_close(_out(back, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "skip"),
    [("flux", r"^(?!.*blocks)|single.*(attn|proj_mlp)"), ("wan", "^$"), ("wan_i2v", "^$"), ("qwen", "^$")],
)
def test_lora_export_loads_in_diffusers(family, skip, tmp_path):
    """diffusers' converter reads the file to the same outputs. Flux: on the blocks but ``linear1``, since its
    converter splits ``linear1`` at Flux-dev's sizes and drops the layers outside the blocks (ComfyUI reads them,
    above). Wan: the scale of ``head.head`` / ``time_projection``, whose alphas it cannot read, is folded in."""
    loader = {"flux": FluxLoraLoaderMixin, "qwen": QwenImageLoraLoaderMixin}.get(family, WanLoraLoaderMixin)
    build, inputs = FAMILIES[family]
    model = _adapted(family, skip=skip, r=3, alpha=2.0)
    path = str(tmp_path / "comfy.safetensors")
    tensors = export_comfyui(model, path)
    if family.startswith("wan"):
        assert "diffusion_model.head.head.alpha" not in tensors and "diffusion_model.blocks.0.ffn.0.alpha" in tensors
    stock = build()
    stock.load_lora_adapter(loader.lora_state_dict(path), prefix="transformer")
    torch.testing.assert_close(_out(stock, inputs), _out(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "qwen"])
@pytest.mark.parametrize(
    ("config_cls", "kwargs"),
    [(HcpLohaConfig, {}), (HcpLokrConfig, {"decompose_both": True, "r": 2}), (HcpLokrConfig, {"r": 2})],
    ids=["loha", "lokr_decomposed", "lokr"],
)
def test_lycoris_export_is_what_comfyui_applies(family, config_cls, kwargs, tmp_path):
    """LoHa and LoKr under LyCORIS' tensor names, on every layer ComfyUI does not fuse; round trip too."""
    build, inputs = FAMILIES[family]
    skip = _FUSED if family in ("flux", "sd3") else "^$"
    if config_cls is HcpLokrConfig:
        skip += "|" + _SWAPPED
    model = _adapted(family, config_cls, skip=skip, **{"alpha": 3.0, **kwargs})
    expected = _out(model, inputs)
    path = str(tmp_path / "comfy.safetensors")
    export_comfyui(model, path)
    comfy = build()
    apply_as_comfyui(comfy, path, _comfyui_targets(family, comfy, path))
    assert (_out(build(), inputs) - expected).abs().max() > 1e-3
    torch.testing.assert_close(_out(comfy, inputs), expected, rtol=1e-5, atol=1e-5)
    back = build()
    import_kohya(back, path)
    torch.testing.assert_close(_out(back, inputs), expected, rtol=1e-5, atol=1e-5)


def test_dora_export_round_trip(tmp_path):
    build, inputs = FAMILIES["wan"]
    model = _adapted("wan", use_dora=True)
    path = str(tmp_path / "dora.safetensors")
    tensors = export_comfyui(model, path)
    assert "diffusion_model.blocks.0.self_attn.q.dora_scale" in tensors
    back = build()
    import_kohya(back, path)
    assert back.peft_config["default"].use_dora
    torch.testing.assert_close(_out(back, inputs), _out(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config_cls", "kwargs", "variant"),
    [(HcpLohaConfig, {}, "LohaBlock"), (HcpLoraConfig, {"use_dora": True}, "DoRA")],
)
def test_variants_a_fused_layer_cannot_hold_are_refused(config_cls, kwargs, variant, tmp_path):
    model = _adapted("flux", config_cls, skip=r"^(?!transformer_blocks\.0\.attn\.to_q$)", **kwargs)
    path = tmp_path / "no.safetensors"
    with pytest.raises(ValueError, match=rf"double_blocks\.0\.img_attn\.qkv.*{variant} cannot be fused"):
        export_comfyui(model, str(path))
    assert not path.exists()


def test_partly_adapted_fused_layer_and_different_scales(tmp_path):
    """``to_q`` and ``to_v`` of a fused ``qkv`` at two scales (no ``to_k``): zero rows for ``to_k``, scales folded."""
    build, inputs = FAMILIES["flux"]
    model = build()
    attach(model, HcpLoraConfig(target_modules=["transformer_blocks.0.attn.to_q"], init_weights=False, alpha=2.0), "a")
    attach(model, HcpLoraConfig(target_modules=["transformer_blocks.0.attn.to_v"], init_weights=False, r=3), "b")
    path = str(tmp_path / "qv.safetensors")
    tensors = export_comfyui(model, path)
    assert tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"].shape[0] == 7
    comfy = build()
    apply_as_comfyui(comfy, path, flux_targets(comfy))
    torch.testing.assert_close(_out(comfy, inputs), _out(model, inputs), rtol=1e-5, atol=1e-5)
    back = build()
    assert import_kohya(back, path) == {"transformer": [f"transformer_blocks.0.attn.to_{p}" for p in "qv"]}
    torch.testing.assert_close(_out(back, inputs), _out(model, inputs), rtol=1e-5, atol=1e-5)


def test_third_party_wan_files_import_as_diffusers_reads_them(tmp_path):
    """musubi/ai-toolkit write ``lora_A``/``lora_B`` under Wan's names, with or without alphas."""
    build, inputs = FAMILIES["wan"]
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for layer, (rows, cols) in {"blocks.0.self_attn.q": (16, 16), "blocks.1.ffn.0": (32, 16)}.items():
        tensors[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, cols, generator=gen)
        tensors[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(rows, 4, generator=gen)
    tensors["diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(2.0)
    path = str(tmp_path / "wan.safetensors")
    save_file(tensors, path)
    stock = build()
    stock.load_lora_adapter(WanLoraLoaderMixin.lora_state_dict(path), prefix="transformer")
    ours = build()
    import_kohya(ours, path)
    expected = _out(stock, inputs)
    assert (_out(build(), inputs) - expected).abs().max() > 1e-2
    torch.testing.assert_close(_out(ours, inputs), expected, rtol=1e-5, atol=1e-5)


def test_bad_comfyui_files_are_refused_and_change_nothing(tmp_path):
    build, inputs = FAMILIES["qwen"]
    model = build()
    base = _out(model, inputs)
    state = {
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.ones(2, 16),
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.ones(16, 2),
        "diffusion_model.transformer_blocks.0.attn.nowhere.lora_down.weight": torch.ones(2, 16),
        "diffusion_model.transformer_blocks.0.attn.nowhere.lora_up.weight": torch.ones(16, 2),
    }
    save_file(state, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointError, match=r"match no layer of ComfyUI's Qwen-Image layout.*attn\.nowhere"):
        import_kohya(model, str(tmp_path / "unknown.safetensors"))
    state = {k.replace("nowhere", "to_k"): v for k, v in state.items()}
    state["diffusion_model.transformer_blocks.0.attn.to_k.lora_up.weight"] = torch.ones(17, 2)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"Shape mismatch in layer diffusion_model\.transformer_blocks\.0\.attn\.to_k"
    ):
        import_kohya(model, str(tmp_path / "shape.safetensors"))
    assert not getattr(model, "peft_config", None)
    torch.testing.assert_close(_out(model, inputs), base, rtol=0, atol=0)


def test_sd_pipelines_export_kohya_names(tmp_path):
    """SD 1.x/SDXL: ComfyUI reads kohya names, so ``export_comfyui`` writes ``export_kohya``'s file."""
    pipe = tiny_pipeline()
    attach(pipe.unet, HcpLoraConfig(target_modules=["to_q", "conv1"], init_weights=False), "a")
    ours = export_comfyui(pipe, str(tmp_path / "comfy.safetensors"))
    kohya = export_kohya(pipe, str(tmp_path / "kohya.safetensors"))
    assert ours.keys() == kohya.keys() and all(torch.equal(ours[k], kohya[k]) for k in ours)
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path / "comfy.safetensors"))
    torch.testing.assert_close(pipe_out(stock), pipe_out(pipe), rtol=1e-4, atol=1e-4)


def test_cli_exports_a_wan_set_from_its_pipeline_folder(tmp_path):
    """``peft-hcp export --format comfyui --pretrained-model <Wan folder>`` loads the Wan pipeline the set was made on;
    ``peft-hcp import`` reads the file back onto it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from peft_hcp.cli import main
    from peft_hcp.hub import load_adapter, save_adapter

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(), scheduler=FlowMatchEulerDiscreteScheduler()
    )
    pipe.save_pretrained(str(tmp_path / "wan"))
    attach(pipe.transformer, HcpLoraConfig(target_modules=["to_q", "ffn.net.2", "proj_out"], init_weights=False), "a")
    save_adapter(pipe, str(tmp_path / "set"))
    out = str(tmp_path / "wan_comfy.safetensors")
    args = ["export", str(tmp_path / "set"), "--format", "comfyui", "--out", out]
    assert main([*args, "--pretrained-model", str(tmp_path / "wan")]) == 0
    expected = export_comfyui(pipe, str(tmp_path / "direct.safetensors"))
    written = load_file(out)
    assert written.keys() == expected.keys() and "diffusion_model.blocks.1.cross_attn.q.lora_up.weight" in written
    assert all(torch.equal(written[k], expected[k]) for k in written)
    assert main(args) == 2  # the set does not fit the embedded SD pipeline: refused, by name
    back = ["import", out, "--out", str(tmp_path / "back"), "--pretrained-model", str(tmp_path / "wan")]
    assert main(back) == 0
    fresh = tiny_wan()
    load_adapter(fresh, str(tmp_path / "back" / "transformer"))
    torch.testing.assert_close(_out(fresh, wan_inputs), _out(pipe.transformer, wan_inputs), rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_pipeline_folder_naming_code_elsewhere(tmp_path, capsys):
    import json

    from peft_hcp.cli import main

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["evil_module", "Thing"]})
    )
    args = ["export", str(tmp_path), "--format", "comfyui", "--out", str(tmp_path / "x.safetensors")]
    assert main([*args, "--pretrained-model", str(tmp_path / "base")]) == 2
    assert "transformer comes from 'evil_module'" in capsys.readouterr().err
    assert "evil_module" not in __import__("sys").modules


def test_wan22_experts_export_to_a_file_each(tmp_path):
    """Wan 2.2's ``transformer_2`` (the low-noise expert) is a model of its own in ComfyUI, with its own file."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    build, inputs = FAMILIES["wan"]
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=build(),
        transformer_2=tiny_wan(seed=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        boundary_ratio=0.875,
    )
    attach(pipe.transformer, HcpLoraConfig(target_modules=["to_q"], init_weights=False), "high")
    attach(pipe.transformer_2, HcpLoraConfig(target_modules=["to_v", "ffn.net.0.proj"], init_weights=False), "low")
    with pytest.raises(ValueError, match="transformer_2 also carries adapters.*component='transformer_2'"):
        export_comfyui(pipe, str(tmp_path / "high.safetensors"))
    path = str(tmp_path / "low.safetensors")
    export_comfyui(pipe, path, component="transformer_2")  # the named expert's adapters only
    comfy = tiny_wan(seed=1)
    apply_as_comfyui(comfy, path, wan_targets(comfy, sorted(file_layers(path))))
    assert {"blocks.0.ffn.0", "blocks.1.self_attn.v", "blocks.1.cross_attn.v"} <= set(file_layers(path))
    torch.testing.assert_close(_out(comfy, inputs), _out(pipe.transformer_2, inputs), rtol=1e-5, atol=1e-5)
    export_comfyui(pipe, str(tmp_path / "high.safetensors"), component="transformer")
    assert sorted(file_layers(str(tmp_path / "high.safetensors"))) == [
        f"blocks.{i}.{a}.q" for i in "01" for a in ("cross_attn", "self_attn")
    ]


def test_flux_pipeline_clip_text_encoder_in_kohya_names(tmp_path):
    """A Flux pipeline's CLIP text encoder goes into the same file under kohya names, which ComfyUI's
    ``model_lora_keys_clip`` maps (``lora_te_text_model_encoder_layers_N_<mlp_fc1 …>``) and stock
    ``FluxPipeline.load_lora_weights`` reads; ``import_kohya`` puts both components back."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from peft_hcp.embedded import tiny_clip_text_model

    def pipeline() -> FluxPipeline:
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            text_encoder=tiny_clip_text_model(),
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=tiny_flux(),
        )

    def outputs(pipe: FluxPipeline) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            text = pipe.text_encoder(torch.tensor([[1, 5, 9, 2]])).last_hidden_state
        return text, _out(pipe.transformer, flux_inputs)

    pipe = pipeline()
    text_layers = ["q_proj", "out_proj", "fc1"]  # diffusers reads old processor names without an out_proj
    attach(pipe.text_encoder, HcpLoraConfig(target_modules=text_layers, init_weights=False, alpha=2.0), "a")
    double = [f"transformer_blocks.{i}.attn.to_{p}" for i in range(3) for p in "qkv"]  # not linear1: see above
    attach(pipe.transformer, HcpLoraConfig(target_modules=double, init_weights=False), "a")
    path = str(tmp_path / "flux.safetensors")
    tensors = export_comfyui(pipe, path)
    clip_map = {"mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj"}
    text_layers = {k.split(".")[0] for k in tensors if not k.startswith("diffusion_model.")}
    assert text_layers and all(
        layer.removeprefix("lora_te_text_model_encoder_layers_").split("_", 1)[1] in clip_map for layer in text_layers
    )
    assert "diffusion_model.double_blocks.2.img_attn.qkv.lora_up.weight" in tensors
    back = pipeline()
    placed = import_kohya(back, path)
    assert set(placed) == {"text_encoder", "transformer"}
    for ours, expected in zip(outputs(back), outputs(pipe)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    stock = pipeline()
    stock.load_lora_weights(path)
    for theirs, expected, base in zip(outputs(stock), outputs(pipe), outputs(pipeline())):
        assert (expected - base).abs().max() > 1e-3
        torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


def test_variants_fused_or_swapped_layers_cannot_hold_are_refused_on_import(tmp_path):
    build, inputs = FAMILIES["flux"]
    gen = torch.Generator().manual_seed(0)
    loha = {name: torch.randn(2, 2, generator=gen) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    lokr = {"lokr_w1": torch.randn(2, 2, generator=gen), "lokr_w2": torch.randn(32, 16, generator=gen)}
    model = build()
    base = _out(model, inputs)
    for layer, parts, match in [
        ("double_blocks.0.img_attn.qkv", loha, "stands for transformer_blocks.0.attn.to_q.*only LoRA splits"),
        ("final_layer.adaLN_modulation.1", lokr, r"orders its rows \(scale, shift\): only LoRA and LoHa"),
    ]:
        path = str(tmp_path / "bad.safetensors")
        save_file({f"diffusion_model.{layer}.{name}": value for name, value in parts.items()}, path)
        with pytest.raises(CheckpointError, match=match):
            import_kohya(model, path)
    assert not getattr(model, "peft_config", None)
    torch.testing.assert_close(_out(model, inputs), base, rtol=0, atol=0)


def test_dense_fused_layers_from_other_trainers_import_as_comfyui_applies_them(tmp_path):
    """sd-scripts and others train ``qkv`` / ``linear1`` as one dense LoRA: each part gets its rows, exactly."""
    build, inputs = FAMILIES["flux"]
    model = build()
    hidden = model.inner_dim
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for layer, rows in {"double_blocks.0.img_attn.qkv": 3 * hidden, "single_blocks.1.linear1": 7 * hidden}.items():
        tensors[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, hidden, generator=gen)
        tensors[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(rows, 4, generator=gen) * 0.3
        tensors[f"diffusion_model.{layer}.alpha"] = torch.tensor(3.0)
    path = str(tmp_path / "dense.safetensors")
    save_file(tensors, path)
    comfy = build()
    apply_as_comfyui(comfy, path, flux_targets(comfy))
    placed = import_kohya(model, path)
    assert len(placed["transformer"]) == 7
    expected = _out(comfy, inputs)
    assert (_out(build(), inputs) - expected).abs().max() > 1e-2
    torch.testing.assert_close(_out(model, inputs), expected, rtol=1e-5, atol=1e-5)
