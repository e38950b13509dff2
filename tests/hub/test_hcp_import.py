"""HCP-Diffusion 2.x checkpoints: its LoRA plugin files and its webui export, checked against PEFT and hcpdiff itself."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
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
