"""HCP-Diffusion 2.x checkpoints: its LoRA plugin files and its webui export, checked against PEFT and hcpdiff itself."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file as read_file
from safetensors.torch import save_file
from torch import nn

from peft_hcp import CheckpointError
from peft_hcp.hub import load_adapter
from peft_hcp.hub.interchange import import_hcp, import_kohya
from tests.helpers import tiny_pipeline


RANK = 4
LAYERS = {  # HCP layer path: (component, module name); the TE path as transformers 4 named it
    "denoiser.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "denoiser.down_blocks.1.resnets.0.conv1": ("unet", "down_blocks.1.resnets.0.conv1"),
    "TE.text_model.encoder.layers.0.self_attn.q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "TE.encoder.layers.1.mlp.fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
}


def _hcp_file(path, scale: float = 0.125) -> dict[str, torch.Tensor]:
    """An HCP LoRA plugin checkpoint as ``NekoPluginSaver`` writes it (``alpha`` = HCP's scale, alpha / rank)."""
    pipe, gen, state = tiny_pipeline(), torch.Generator().manual_seed(0), {}
    for layer, (component, name) in LAYERS.items():
        w = getattr(pipe, component).get_submodule(name).weight
        state[f"{layer}.___.layer.W_down"] = torch.randn(RANK, *w.shape[1:], generator=gen) * 0.5
        state[f"{layer}.___.layer.W_up"] = (
            torch.randn(w.shape[0], RANK, *([1, 1] if w.dim() == 4 else []), generator=gen) * 0.5
        )
        state[f"{layer}.___.alpha"] = torch.tensor(scale)
    save_file(state, str(path))
    return state


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) on fixed inputs."""
    from peft_hcp.embedded import unet_inputs

    tokens = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(*unet_inputs()).sample, pipe.text_encoder(tokens).last_hidden_state


def _peft_reference(state: dict[str, torch.Tensor]):
    """PEFT's own LoRA with the same factors and lora_alpha = HCP scale × rank."""
    pipe = tiny_pipeline()
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        names = {layer: name for layer, (c, name) in LAYERS.items() if c == component}
        scale = {name: float(state[f"{layer}.___.alpha"]) * RANK for layer, name in names.items()}
        inject_adapter_in_model(LoraConfig(target_modules=list(names.values()), r=RANK, alpha_pattern=scale), model)
        with torch.no_grad():
            for layer, name in names.items():
                model.get_submodule(name).lora_A["default"].weight.copy_(state[f"{layer}.___.layer.W_down"])
                model.get_submodule(name).lora_B["default"].weight.copy_(state[f"{layer}.___.layer.W_up"])
    return pipe


def test_hcp_plugin_checkpoint_imports_as_peft_lora(tmp_path):
    state = _hcp_file(tmp_path / "lora.safetensors")
    pipe = tiny_pipeline()
    placed = import_hcp(pipe, str(tmp_path / "lora.safetensors"), adapter_name="hcp")
    assert placed == {c: sorted(n for _, (cc, n) in LAYERS.items() if cc == c) for c in ("unet", "text_encoder")}
    expected = _outputs(_peft_reference(state))
    assert (expected[0] - _outputs(tiny_pipeline())[0]).abs().max() > 1e-3
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_hcp_plugin_checkpoint_matches_hcpdiff(tmp_path):
    """hcpdiff's ``HCPLoraLoader`` on HCP's trainer layout (``denoiser`` / ``TE``) is the reference."""
    pytest.importorskip("hcpdiff")
    from hcpdiff.ckpt_manager.loader import HCPLoraLoader
    from rainbowneko.ckpt_manager import LocalCkptSource
    from rainbowneko.ckpt_manager.format import SafeTensorFormat

    path = str(tmp_path / "lora.safetensors")
    state = _hcp_file(path)
    hcp_pipe = tiny_pipeline()
    trainer_model = nn.Module()
    trainer_model.denoiser, trainer_model.TE = hcp_pipe.unet, hcp_pipe.text_encoder
    hcp_state = {k.replace("TE.text_model.", "TE."): v for k, v in state.items()}  # transformers 5 paths for hcpdiff
    save_file(hcp_state, str(tmp_path / "hcp.safetensors"))
    loader = HCPLoraLoader(format=SafeTensorFormat(), source=LocalCkptSource(), path=str(tmp_path / "hcp.safetensors"))
    group = loader._load_to("lora", trainer_model)
    assert group.state_dict().keys() == hcp_state.keys()  # the file is in the format HCP writes
    expected = _outputs(hcp_pipe)

    pipe = tiny_pipeline()
    import_hcp(pipe, path)
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_hcp_webui_export_imports_at_full_strength(tmp_path):
    """HCP's webui export writes the scale where kohya expects alpha; read as kohya it was 1/rank as strong."""
    state = _hcp_file(tmp_path / "lora.safetensors")
    webui = {}
    for key, value in state.items():  # HCP's LoraConverter.convert_to_webui: names only, values as they are
        layer, _, part = key.partition(".___.")
        component, name = LAYERS[layer]
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        part = {"layer.W_down": "lora_down.weight", "layer.W_up": "lora_up.weight"}.get(part, part)
        webui[prefix + name.replace(".", "_") + "." + part] = value
    save_file(webui, str(tmp_path / "webui.safetensors"))
    expected = _outputs(_peft_reference(state))
    pipe, weak = tiny_pipeline(), tiny_pipeline()
    import_kohya(pipe, str(tmp_path / "webui.safetensors"), alpha_is_scale=True)
    import_kohya(weak, str(tmp_path / "webui.safetensors"))
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (_outputs(weak)[0] - expected[0]).abs().max() > 1e-3

    from peft_hcp.cli import main

    args = ["import", str(tmp_path / "webui.safetensors"), "--out", str(tmp_path / "set"), "--alpha-is-scale"]
    assert main(args) == 0
    loaded = tiny_pipeline()
    load_adapter(loaded, str(tmp_path / "set"))
    torch.testing.assert_close(_outputs(loaded)[0], expected[0], rtol=1e-5, atol=1e-5)


def test_cli_import_writes_a_standard_adapter_set(tmp_path):
    from peft_hcp.cli import main

    state = _hcp_file(tmp_path / "lora.safetensors")
    assert main(["import", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "set")]) == 0
    pipe = tiny_pipeline()
    load_adapter(pipe, str(tmp_path / "set"))
    for ours, ref in zip(_outputs(pipe), _outputs(_peft_reference(state))):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_refused_hcp_file_leaves_the_model_as_it_was(tmp_path):
    state = _hcp_file(tmp_path / "lora.safetensors")
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for bad, match in [
        ({**state, "denoiser.no_such_layer.___.alpha": torch.tensor(1.0)}, "denoiser.no_such_layer"),
        ({**state, f"{next(iter(LAYERS))}.___.layer.bias": torch.zeros(32)}, "layer.bias"),
    ]:
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(CheckpointError, match=match):
            import_hcp(pipe, str(tmp_path / "bad.safetensors"))
        assert not hasattr(pipe.unet, "peft_config") and not hasattr(pipe.text_encoder, "peft_config")
        assert pipe.unet.state_dict().keys() == before.keys()


def _hcp_loader_on(model: nn.Module, path) -> None:
    """hcpdiff 2.6's own ``HCPLoraLoader``, loading ``path`` onto ``model`` (whose paths the file's keys are)."""
    from hcpdiff.ckpt_manager.loader import HCPLoraLoader
    from rainbowneko.ckpt_manager import LocalCkptSource
    from rainbowneko.ckpt_manager.format import SafeTensorFormat

    loader = HCPLoraLoader(format=SafeTensorFormat(), source=LocalCkptSource(), path=str(path))
    group = loader._load_to("lora", model)
    assert group.plugin_dict  # it found the layers


def _unrooted(state: dict[str, torch.Tensor], root: str) -> dict[str, torch.Tensor]:
    """The keys under ``root``, without it (transformers 5 CLIP paths): a checkpoint of one bare model."""
    return {k[len(root) :].removeprefix("text_model."): v for k, v in state.items() if k.startswith(root)}


def test_bare_model_checkpoints_take_their_component_from_the_file_name(tmp_path):
    """``lora_unet-N`` / ``lora_TE-N`` (HCP 2.x savers on a bare model): keys without ``denoiser.`` / ``TE.``."""
    pytest.importorskip("hcpdiff")
    state = _hcp_file(tmp_path / "lora.safetensors")
    unet_file, te_file = tmp_path / "lora_unet-1000.safetensors", tmp_path / "lora_TE-1000.safetensors"
    save_file(_unrooted(state, "denoiser."), str(unet_file))
    save_file(_unrooted(state, "TE."), str(te_file))
    reference = tiny_pipeline()
    _hcp_loader_on(reference.unet, unet_file)
    _hcp_loader_on(reference.text_encoder, te_file)
    expected = _outputs(reference)

    pipe = tiny_pipeline()
    assert import_hcp(pipe, str(unet_file)) == {"unet": [n for c, n in LAYERS.values() if c == "unet"]}
    assert list(import_hcp(pipe, str(te_file))) == ["text_encoder"]
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    # a name that says nothing: the component whose layers the paths name; component= overrides
    (tmp_path / "style.safetensors").write_bytes(unet_file.read_bytes())
    found = tiny_pipeline()
    assert list(import_hcp(found, str(tmp_path / "style.safetensors"))) == ["unet"]
    torch.testing.assert_close(_outputs(found)[0], expected[0], rtol=1e-5, atol=1e-5)
    assert list(import_hcp(tiny_pipeline(), str(tmp_path / "style.safetensors"), component="unet")) == ["unet"]
    with pytest.raises(CheckpointError, match="match no layer"):  # the name says TE, the layers are the UNet's
        import_hcp(tiny_pipeline(), str(unet_file), component="text_encoder")


def test_bare_checkpoint_naming_no_component_is_refused(tmp_path):
    state = _hcp_file(tmp_path / "lora.safetensors")
    mixed = {**_unrooted(state, "denoiser."), **_unrooted(state, "TE.")}  # layers of two models, no roots
    save_file(mixed, str(tmp_path / "style.safetensors"))
    pipe = tiny_pipeline()
    with pytest.raises(CheckpointError, match="pass component="):
        import_hcp(pipe, str(tmp_path / "style.safetensors"))
    assert not hasattr(pipe.unet, "peft_config") and not hasattr(pipe.text_encoder, "peft_config")


def _hcp1_file(path, state: dict[str, torch.Tensor], root: str, scale_name: str = "alpha") -> dict[str, torch.Tensor]:
    """An HCP 1.x ``CkptManagerSafe`` checkpoint of one model: ``lora:`` / ``lora_ema:`` parts, 1.x tensor names."""
    names = {"layer.W_down": "layer.lora_down.weight", "layer.W_up": "layer.lora_up.weight", "alpha": scale_name}
    lora = {}
    for key, value in state.items():
        if key.startswith(root):
            layer, _, part = key[len(root) :].partition(".___.")
            lora[f"{layer}.___.{names[part]}"] = value
    nested = {f"lora:{k}": v for k, v in lora.items()}
    nested.update({f"lora_ema:{k}": v * 0.5 if "lora_up" in k else v.clone() for k, v in lora.items()})
    save_file(nested, str(path))
    return lora


def _hand_merged(lora: dict[str, torch.Tensor], model: nn.Module) -> None:
    """W += scale · up @ down on ``model`` itself (the math of HCP's ``reparameterization_to_host``)."""
    with torch.no_grad():
        for key in lora:
            if not key.endswith("lora_down.weight"):
                continue
            layer = key.removesuffix(".___.layer.lora_down.weight")
            down, up = lora[key], lora[f"{layer}.___.layer.lora_up.weight"]
            scale = next(lora[f"{layer}.___.{n}"] for n in ("alpha", "scale") if f"{layer}.___.{n}" in lora)
            delta = torch.einsum("or,ri...->oi...", up.flatten(1), down)
            model.get_submodule(layer.removeprefix("text_model.")).weight.add_(scale * delta)


def test_hcp_1x_nested_checkpoints_import_to_the_hand_merge(tmp_path):
    """HCP 1.x ``unet-N`` / ``text_encoder-N``: ``lora:`` parts, ``layer.lora_down.weight``, ``scale`` in early files."""
    state = _hcp_file(tmp_path / "lora.safetensors")
    unet_lora = _hcp1_file(tmp_path / "unet-1000.safetensors", state, "denoiser.")
    te_lora = _hcp1_file(tmp_path / "text_encoder-1000.safetensors", state, "TE.", scale_name="scale")
    merged = tiny_pipeline()
    _hand_merged(unet_lora, merged.unet)
    _hand_merged(te_lora, merged.text_encoder)
    expected = _outputs(merged)
    assert (expected[0] - _outputs(tiny_pipeline())[0]).abs().max() > 1e-3

    pipe = tiny_pipeline()
    import_hcp(pipe, str(tmp_path / "unet-1000.safetensors"))
    import_hcp(pipe, str(tmp_path / "text_encoder-1000.safetensors"))
    for ours, ref in zip(_outputs(pipe), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    ema = tiny_pipeline()  # the EMA copy, on request: its ups are half as large
    import_hcp(ema, str(tmp_path / "unet-1000.safetensors"), ema=True)
    halved = tiny_pipeline()
    _hand_merged({k: v * 0.5 if "lora_up" in k else v for k, v in unet_lora.items()}, halved.unet)
    torch.testing.assert_close(_outputs(ema)[0], _outputs(halved)[0], rtol=1e-5, atol=1e-5)

    nested = read_file(str(tmp_path / "unet-1000.safetensors"))
    for extra, match in [
        ({"base:conv_in.weight": torch.zeros(1)}, "'base:' part"),
        ({"plugin:" + next(iter(unet_lora)): torch.zeros(1)}, "both the 'lora:' and 'plugin:'"),
    ]:
        save_file({**nested, **extra}, str(tmp_path / "unet-2000.safetensors"))
        refused = tiny_pipeline()
        with pytest.raises(CheckpointError, match=match):
            import_hcp(refused, str(tmp_path / "unet-2000.safetensors"))
        assert not hasattr(refused.unet, "peft_config")


def test_sdxl_checkpoint_matches_hcpdiff(tmp_path):
    """SDXL: ``TE.clip_L.`` and ``TE.clip_bigG.`` are the two text encoders of HCP's ``SDXLTextEncoder``."""
    pytest.importorskip("hcpdiff")
    from tests.interchange_hosts import sdxl_latents, tiny_sdxl_pipeline

    host, gen, state = tiny_sdxl_pipeline(), torch.Generator().manual_seed(1), {}
    layers = {  # HCP's paths (transformers 4 CLIP: text_model.); transformers 5 dropped that level from clip_L only
        "denoiser.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (host.unet, "denoiser."),
        "TE.clip_L.text_model.encoder.layers.0.self_attn.q_proj": (host.text_encoder, "TE.clip_L.text_model."),
        "TE.clip_bigG.text_model.encoder.layers.1.mlp.fc2": (host.text_encoder_2, "TE.clip_bigG."),
        "TE.clip_bigG.text_projection": (host.text_encoder_2, "TE.clip_bigG."),
    }
    for layer, (model, root) in layers.items():
        w = model.get_submodule(layer.removeprefix(root)).weight
        state[f"{layer}.___.layer.W_down"] = torch.randn(RANK, w.shape[1], generator=gen) * 0.5
        state[f"{layer}.___.layer.W_up"] = torch.randn(w.shape[0], RANK, generator=gen) * 0.5
        state[f"{layer}.___.alpha"] = torch.tensor(0.25)
    save_file(state, str(tmp_path / "xl.safetensors"))
    reference = tiny_sdxl_pipeline()
    trainer_model, te = nn.Module(), nn.Module()
    te.clip_L, te.clip_bigG = reference.text_encoder, reference.text_encoder_2
    trainer_model.denoiser, trainer_model.TE = reference.unet, te
    hcp_state = {k.replace("TE.clip_L.text_model.", "TE.clip_L."): v for k, v in state.items()}
    save_file(hcp_state, str(tmp_path / "hcp.safetensors"))
    _hcp_loader_on(trainer_model, tmp_path / "hcp.safetensors")

    pipe = tiny_sdxl_pipeline()
    placed = import_hcp(pipe, str(tmp_path / "xl.safetensors"))
    assert sorted(placed) == ["text_encoder", "text_encoder_2", "unet"]
    tokens = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for ours, ref in [(pipe.text_encoder, reference.text_encoder), (pipe.text_encoder_2, reference.text_encoder_2)]:
            torch.testing.assert_close(ours(tokens)[0], ref(tokens)[0], rtol=1e-5, atol=1e-5)
    expected = sdxl_latents(reference)
    assert (expected - sdxl_latents(tiny_sdxl_pipeline())).abs().max() > 1e-4
    # the untrained tiny SDXL's latents reach ~750: float32 rounding is relative to that
    torch.testing.assert_close(sdxl_latents(pipe), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))

    # the text encoders alone, without the TE root (HCP's saver on the SDXLTextEncoder)
    save_file(_unrooted(state, "TE."), str(tmp_path / "lora_TE-10.safetensors"))
    bare = tiny_sdxl_pipeline()
    assert sorted(import_hcp(bare, str(tmp_path / "lora_TE-10.safetensors"))) == ["text_encoder", "text_encoder_2"]
    with torch.no_grad():
        torch.testing.assert_close(bare.text_encoder_2(tokens)[0], reference.text_encoder_2(tokens)[0])


def test_cli_import_takes_the_component(tmp_path, capsys):
    from peft_hcp.cli import main

    state = _hcp_file(tmp_path / "lora.safetensors")
    save_file(_unrooted(state, "denoiser."), str(tmp_path / "style.safetensors"))
    assert (
        main(["import", str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "set"), "--component", "unet"])
        == 0
    )
    pipe = tiny_pipeline()
    load_adapter(pipe, str(tmp_path / "set"))
    torch.testing.assert_close(_outputs(pipe)[0], _outputs(_peft_reference(state))[0], rtol=1e-5, atol=1e-5)

    webui = tmp_path / "webui.safetensors"  # a kohya file for Wan 2.2's second transformer, on an SD pipeline
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3)}, str(webui))
    assert main(["import", str(webui), "--out", str(tmp_path / "x"), "--component", "transformer_2"]) == 2
    assert "has no transformer_2" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bare_checkpoint_whose_paths_fit_two_components_is_refused(tmp_path):
    """Paths that name layers of the denoiser and of the text encoder alike: which one is meant, only the user knows."""
    import types

    from peft_hcp.embedded import tiny_unet

    state = _hcp_file(tmp_path / "lora.safetensors")
    save_file(_unrooted(state, "denoiser."), str(tmp_path / "style.safetensors"))
    twins = types.SimpleNamespace(components={"unet": tiny_unet(), "text_encoder": tiny_unet()})
    with pytest.raises(CheckpointError, match="the layers of several components.*pass component="):
        import_hcp(twins, str(tmp_path / "style.safetensors"))
    assert list(import_hcp(twins, str(tmp_path / "style.safetensors"), component="text_encoder")) == ["text_encoder"]
