"""LoRA interchange: kohya/webui files both ways and diffusers' LoRA layout, checked against diffusers and PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_hcp import CheckpointError, HcpLohaConfig, HcpLoraConfig
from peft_hcp.embedded import (
    sd15_unet,
    tiny_clip_text_model,
    tiny_unet,
    unet_inputs,
)
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import (
    export_diffusers,
    export_kohya,
    import_kohya,
    kohya_name_table,
)
from tests.helpers import pipe_out, tiny_pipeline, unet_out


CONFIGS = {"lora": HcpLoraConfig, "loha": HcpLohaConfig}


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_kohya_names_tiny_unet_every_layer():
    unet = tiny_unet()
    table = kohya_name_table(unet, "lora_unet")
    assert sorted(table.values()) == sorted(_layers(unet))  # every layer, each once: the map is injective
    for name in (
        "down_blocks.1.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "time_embedding.linear_1",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ):
        assert table["lora_unet_" + name.replace(".", "_")] == name
    # the table survives adapters being attached (wrappers are looked through, plugin weights skipped)
    attach(unet, HcpLoraConfig(target_modules=[""]), "a")
    assert kohya_name_table(unet, "lora_unet") == table


def test_kohya_names_sd15_layout():
    with torch.device("meta"):  # names only: no 3.5 GB of weights
        unet = sd15_unet()
    table = kohya_name_table(unet, "lora_unet")
    assert len(table) == len(_layers(unet)) == 282
    known = [  # as they appear in SD1.5 LoRA files made by sd-scripts
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
        "lora_unet_down_blocks_0_resnets_1_time_emb_proj",
        "lora_unet_up_blocks_0_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_2_downsamplers_0_conv",
        "lora_unet_up_blocks_2_upsamplers_0_conv",
    ]
    for key in known:
        assert key in table, key
    assert table["lora_unet_up_blocks_0_resnets_0_conv_shortcut"] == "up_blocks.0.resnets.0.conv_shortcut"


def test_kohya_names_clip_text_encoder_keep_text_model():
    table = kohya_name_table(tiny_clip_text_model(), "lora_te")
    assert table["lora_te_text_model_encoder_layers_1_mlp_fc2"] == "encoder.layers.1.mlp.fc2"
    assert table["lora_te_text_model_encoder_layers_0_self_attn_out_proj"] == "encoder.layers.0.self_attn.out_proj"


def _adapted_pipeline(folder, kind, alpha=3.0):
    pipe = tiny_pipeline()
    config = CONFIGS[kind]
    attach(pipe.unet, config(target_modules=[""], init_weights=False, alpha=alpha), "a")
    attach(pipe.text_encoder, config(target_modules=["re:.*(self_attn|mlp)$"], init_weights=False, alpha=alpha), "a")
    return pipe


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_kohya_round_trip(kind, tmp_path):
    pipe = _adapted_pipeline(str(tmp_path), kind)
    out = pipe_out(pipe)
    tensors = export_kohya(pipe, str(tmp_path / "net.safetensors"))
    unet_layers = len(_layers(tiny_unet()))
    assert sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in tensors) == unet_layers
    assert float(tensors["lora_unet_conv_in.alpha"]) == pytest.approx(3.0)  # kohya alpha == HCP alpha (auto scale)
    fresh = tiny_pipeline()
    import_kohya(fresh, str(tmp_path / "net.safetensors"), adapter_name="imported")
    assert fresh.unet.peft_config["imported"].alpha == 3.0 and fresh.unet.peft_config["imported"].r == 4
    torch.testing.assert_close(pipe_out(fresh), out, rtol=0, atol=0)
    again = export_kohya(fresh, str(tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_stock_diffusers_loads_our_kohya_file(tmp_path):
    """diffusers' own kohya converter is an independent check of every UNet and text-encoder name."""
    pipe = _adapted_pipeline(str(tmp_path), "lora")
    out = pipe_out(pipe)
    export_kohya(pipe, str(tmp_path / "net.safetensors"))
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path / "net.safetensors"))
    torch.testing.assert_close(pipe_out(stock), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_diffusers_layout_export(kind, tmp_path):
    pipe = _adapted_pipeline(str(tmp_path), kind)
    out = pipe_out(pipe)
    export_diffusers(pipe, str(tmp_path / "diffusers"))
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path / "diffusers"))
    assert (pipe_out(stock) - pipe_out(tiny_pipeline())).abs().max() > 1e-3
    torch.testing.assert_close(pipe_out(stock), out, rtol=1e-4, atol=1e-4)


def test_mixed_rank_and_alpha_import_matches_peft_lora(tmp_path):
    """Per-layer ranks and alphas (padded / folded on import) give what PEFT's LoRA gives with patterns."""
    gen = torch.Generator().manual_seed(1)
    layers = {  # module: (rank, alpha)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (2, 1.0),
        "down_blocks.1.resnets.0.conv1": (4, 8.0),
        "up_blocks.1.attentions.0.proj_out": (3, 3.0),
    }
    unet = tiny_unet()
    tensors = {}
    for name, (rank, alpha) in layers.items():
        weight = unet.get_submodule(name).weight
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []))
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=gen)
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=gen)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    import_kohya(unet, str(tmp_path / "mixed.safetensors"))

    reference = tiny_unet()
    config = LoraConfig(
        target_modules=list(layers),
        r=2,
        lora_alpha=1.0,
        rank_pattern={n: r for n, (r, _) in layers.items()},
        alpha_pattern={n: a for n, (_, a) in layers.items()},
    )
    inject_adapter_in_model(config, reference)
    with torch.no_grad():
        for name in layers:
            key = "lora_unet_" + name.replace(".", "_")
            layer = reference.get_submodule(name)
            layer.lora_A["default"].weight.copy_(tensors[f"{key}.lora_down.weight"])
            layer.lora_B["default"].weight.copy_(tensors[f"{key}.lora_up.weight"])
    batch = unet_inputs()
    torch.testing.assert_close(unet_out(unet, batch), unet_out(reference, batch), rtol=1e-5, atol=1e-5)


def test_import_rejects_bad_files(tmp_path):
    unet = tiny_unet()
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    base = {f"{good}.lora_down.weight": torch.zeros(2, 32), f"{good}.lora_up.weight": torch.zeros(32, 2)}

    def attempt(tensors, match):
        path = str(tmp_path / "bad.safetensors")
        save_file(tensors, path)
        with pytest.raises(CheckpointError, match=match):
            import_kohya(unet, path)
        assert not hasattr(unet, "peft_config")  # nothing was attached

    attempt({**base, f"{good}.lora_mid.weight": torch.zeros(1)}, "unknown keys.*lora_mid")
    attempt(
        {
            **base,
            "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 32),
            "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 2),
        },
        "lora_unet_no_such_layer",
    )
    attempt({**base, f"{good}.lora_up.weight": torch.zeros(64, 2)}, r"Shape mismatch in layer .*attn1_to_q.*lora_up")
    attempt({f"{good}.lora_down.weight": torch.zeros(2, 32)}, "incomplete.*lora_up")
    pickle = tmp_path / "net.safetensors"
    torch.save(base, pickle)  # a pickle under a safetensors name is not read
    with pytest.raises(CheckpointError):
        import_kohya(unet, str(pickle))


def test_export_refuses_what_kohya_cannot_hold(tmp_path):
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=["re:.*attn1$"], lora_bias=True), "biased")
    with pytest.raises(ValueError, match="no LoRA bias"):
        export_kohya(unet, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no low-rank adapters"):
        export_kohya(tiny_unet(), str(tmp_path / "x.safetensors"))


def test_cli_export_import_round_trip(tmp_path):
    """``peft-hcp export --format kohya`` then ``peft-hcp import`` on the embedded pipeline."""
    from peft_hcp.cli import main
    from peft_hcp.embedded.pipeline import embedded_pipeline
    from peft_hcp.hub import save_adapter

    pipe = embedded_pipeline()
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False, alpha=2.0), "style")
    save_adapter(pipe, str(tmp_path / "set"))
    assert main(["export", str(tmp_path / "set"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main(["export", str(tmp_path / "set"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    assert (
        main(["import", str(tmp_path / "k.safetensors"), "--out", str(tmp_path / "back"), "--adapter-name", "style"])
        == 0
    )
    original = load_file(str(tmp_path / "set" / "unet" / "adapter_model.safetensors"))
    back = load_file(str(tmp_path / "back" / "unet" / "adapter_model.safetensors"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert main(["import", str(tmp_path / "set" / "adapter_set.json"), "--out", str(tmp_path / "x")]) == 2


# -- the files people already have: placed by diffusers' own converter ----------------------------------------


def _random_lora(layers: dict[str, nn.Module], rank: int = 2, alpha: float = 3.0, seed: int = 0) -> dict:
    """kohya LoRA tensors for ``{file layer: host}``, random (both factors non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, host in layers.items():
        w = host.weight
        tensors[f"{layer}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.3
        tensors[f"{layer}.lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=gen) * 0.3
        )
        tensors[f"{layer}.alpha"] = torch.tensor(alpha)
    return tensors


def test_sdxl_file_with_sgm_and_text_encoder_names_imports_as_diffusers_loads_it(tmp_path):
    """SGM UNet names (``input_blocks_3_1`` …), ``lora_te1_`` and ``lora_te2_``."""
    from tests.interchange_hosts import sdxl_latents, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    block = "transformer_blocks_0"
    sgm = {  # tiny SDXL, one layer per block: input_blocks_3 = down_blocks.1, output_blocks_1 = up_blocks.0.attentions.1
        f"lora_unet_input_blocks_3_1_{block}_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        f"lora_unet_middle_block_1_{block}_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        f"lora_unet_output_blocks_1_1_{block}_ff_net_2": "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
        "lora_unet_output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    }
    layers = {layer: pipe.unet.get_submodule(name) for layer, name in sgm.items()}
    for proj in ("q_proj", "out_proj"):  # stock diffusers needs an out_proj to read a text encoder's layers
        layers[f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"] = pipe.text_encoder.get_submodule(
            f"encoder.layers.0.self_attn.{proj}"
        )
    te2 = "text_model.encoder.layers.1.mlp.fc1"
    layers["lora_te2_" + te2.replace(".", "_")] = pipe.text_encoder_2.get_submodule(te2)
    save_file(_random_lora(layers), str(tmp_path / "sdxl.safetensors"))

    stock = tiny_sdxl_pipeline()
    stock.load_lora_weights(str(tmp_path / "sdxl.safetensors"))
    expected = sdxl_latents(stock)
    assert (expected - sdxl_latents(pipe)).abs().max() > 1e-3  # every part of the file takes effect
    placed = import_kohya(pipe, str(tmp_path / "sdxl.safetensors"))
    assert placed["unet"] == sorted(sgm.values()) and placed["text_encoder_2"] == [te2]
    torch.testing.assert_close(sdxl_latents(pipe), expected, rtol=1e-4, atol=1e-4)


def test_text_encoder_names_with_or_without_text_model(tmp_path):
    """transformers 5's ``CLIPTextModel`` has no ``text_model.``; LyCORIS then writes ``lora_te_encoder_…``, which
    stock diffusers cannot place. Both spellings import to what diffusers makes of the older one."""
    pipe = tiny_pipeline()
    hosts = {
        f"encoder_layers_{i}_self_attn_{p}_proj": pipe.text_encoder.get_submodule(
            f"encoder.layers.{i}.self_attn.{p}_proj"
        )
        for i in (0, 1)
        for p in ("q", "v", "out")
    }  # stock diffusers needs an out_proj to read the file
    save_file(_random_lora({f"lora_te_text_model_{k}": v for k, v in hosts.items()}), str(tmp_path / "old.safetensors"))
    save_file(_random_lora({f"lora_te_{k}": v for k, v in hosts.items()}), str(tmp_path / "new.safetensors"))
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path / "old.safetensors"))
    expected = pipe_out(stock)
    for name in ("old", "new"):
        fresh = tiny_pipeline()
        import_kohya(fresh, str(tmp_path / f"{name}.safetensors"))
        torch.testing.assert_close(pipe_out(fresh), expected, rtol=1e-4, atol=1e-4)


def test_lycoris_loha_with_transformers5_text_names_imports_as_lycoris_runs_it(tmp_path):
    """LyCORIS names the text encoder from ``named_modules()``: ``lora_te_encoder_layers_0_…`` under transformers 5."""
    loha = pytest.importorskip("lycoris.modules.loha")
    pipe = tiny_pipeline()
    hosts = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": pipe.unet.get_submodule(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        ),
        "lora_unet_down_blocks_1_resnets_0_conv1": pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1"),
        "lora_te_encoder_layers_0_self_attn_v_proj": pipe.text_encoder.get_submodule(
            "encoder.layers.0.self_attn.v_proj"
        ),
    }
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer, host in hosts.items():
        out, fan_in = host.weight.shape[0], host.weight[0].numel()
        for pair in (1, 2):
            tensors[f"{layer}.hada_w{pair}_a"] = torch.randn(out, 2, generator=gen) * 0.3
            tensors[f"{layer}.hada_w{pair}_b"] = torch.randn(2, fan_in, generator=gen) * 0.3
        tensors[f"{layer}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "loha.safetensors"))

    reference = tiny_pipeline()  # LyCORIS builds each layer from the file and hooks it into its host's forward
    modules = []  # (LyCORIS 4.1.3's merge_to applies a LoHa's alpha / rank twice; its forward once)
    for layer in hosts:
        model = reference.unet if layer.startswith("lora_unet_") else reference.text_encoder
        name = layer.removeprefix("lora_unet_").removeprefix("lora_te_")
        host = model.get_submodule({n.replace(".", "_"): n for n, _ in model.named_modules()}[name])
        with torch.no_grad():  # as LyCORIS' own loader calls it
            weights = loha.LohaModule.extract_state_dict(tensors, layer)
            modules.append(loha.LohaModule.make_module_from_state_dict(layer, host, *weights))
        modules[-1].apply_to()
    expected = pipe_out(reference)
    assert (expected - pipe_out(pipe)).abs().max() > 1e-3
    import_kohya(pipe, str(tmp_path / "loha.safetensors"))
    assert pipe.text_encoder.peft_config["default"].peft_type.value == "HCP_LOHA"
    torch.testing.assert_close(pipe_out(pipe), expected, rtol=1e-4, atol=1e-4)


def test_flux_kohya_file_imports_as_diffusers_loads_it(tmp_path):
    """Flux files in sd-scripts' BFL names (``lora_unet_double_blocks_0_img_attn_proj`` …), a fused ``qkv`` included."""
    from diffusers.loaders import FluxLoraLoaderMixin

    from peft_hcp.embedded.models import flux_inputs, tiny_flux

    model = tiny_flux()
    names = {
        "lora_unet_double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
        "lora_unet_double_blocks_1_txt_mlp_0": "transformer_blocks.1.ff_context.net.0.proj",
        "lora_unet_single_blocks_0_linear2": "single_transformer_blocks.0.proj_out",
    }
    tensors = _random_lora({k: model.get_submodule(v) for k, v in names.items()})
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"  # one file layer for to_q, to_k, to_v: split as diffusers splits it
    q = model.get_submodule("transformer_blocks.0.attn.to_q").weight
    gen = torch.Generator().manual_seed(1)
    tensors[f"{qkv}.lora_down.weight"] = torch.randn(2, q.shape[1], generator=gen) * 0.3
    tensors[f"{qkv}.lora_up.weight"] = torch.randn(3 * q.shape[0], 2, generator=gen) * 0.3
    tensors[f"{qkv}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    stock = tiny_flux()
    state = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path / "flux.safetensors"))
    stock.load_lora_adapter(state, prefix="transformer")
    placed = import_kohya(model, str(tmp_path / "flux.safetensors"))
    fused = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    assert placed == {"transformer": sorted([*names.values(), *fused])}
    inputs = flux_inputs()
    with torch.no_grad():
        expected, base, ours = stock(**inputs).sample, tiny_flux()(**inputs).sample, model(**inputs).sample
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_from_a_peft_model_loads_with_stock_diffusers(fmt, tmp_path):
    """``get_peft_model(unet, ...)`` exports under the UNet's names (it wrote ``lora_te_base_model_model_…``)."""
    from peft import get_peft_model

    pipe = tiny_pipeline()
    model = get_peft_model(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn.?$"], init_weights=False, alpha=2.0))
    out = pipe_out(pipe)
    path = str(tmp_path / "k.safetensors") if fmt == "kohya" else str(tmp_path / "d")
    (export_kohya if fmt == "kohya" else export_diffusers)(model, path)
    stock = tiny_pipeline()
    stock.load_lora_weights(path)
    torch.testing.assert_close(pipe_out(stock), out, rtol=1e-4, atol=1e-4)


def test_export_refuses_names_the_stock_loader_would_misplace(tmp_path):
    """diffusers reads kohya Flux files in BFL names only: a diffusers-named single-block layer would be lost."""
    from peft import get_peft_model

    from peft_hcp.embedded.models import tiny_flux

    model = get_peft_model(tiny_flux(), HcpLoraConfig(target_modules=["proj_out"], init_weights=False))
    with pytest.raises(ValueError, match="lora_transformer_single_transformer_blocks_0_proj_out"):
        export_kohya(model, str(tmp_path / "flux.safetensors"))
    assert not (tmp_path / "flux.safetensors").exists()
    export_diffusers(model, str(tmp_path / "d"))  # diffusers' own layout holds it


def test_diffusers_layout_files_import_through_diffusers(tmp_path):
    """diffusers' own layout (our export, ai-toolkit's Flux files) is read whole by its converter."""
    from peft_hcp.embedded.models import flux_inputs, tiny_flux

    pipe = _adapted_pipeline(str(tmp_path), "lora")
    out = pipe_out(pipe)
    export_diffusers(pipe, str(tmp_path / "d"))
    fresh = tiny_pipeline()
    import_kohya(fresh, str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(pipe_out(fresh), out, rtol=1e-4, atol=1e-4)

    flux = tiny_flux()
    attach(flux, HcpLoraConfig(target_modules=["to_q", "to_out.0", "proj_mlp"], init_weights=False, alpha=2.0), "a")
    export_diffusers(flux, str(tmp_path / "flux"))  # transformer.<module>.lora_A/B.weight, as ai-toolkit writes
    again = tiny_flux()
    import_kohya(again, str(tmp_path / "flux" / "pytorch_lora_weights.safetensors"))
    inputs = flux_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).sample, flux(**inputs).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="match no layer"):  # a UNet file on a Flux model: refused
        import_kohya(tiny_flux(), str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
