"""DoRA (``HcpLoraConfig(use_dora=True)``) computes what PEFT's and LyCORIS's DoRA compute, and round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from peft_hcp import CheckpointError, HcpLoraConfig
from peft_hcp.embedded import tiny_unet
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import (
    export_diffusers,
    export_kohya,
    import_kohya,
    kohya_name_table,
)
from tests.helpers import lycoris_network, unet_out


# attention + feed-forward linears, and the resnet convolutions (3x3) and shortcut (1x1)
TARGETS = ["re:.*attn.?$", "re:.*ff$", "re:.*resnets\\.\\d+\\.conv\\d$", "re:.*conv_shortcut$"]
RANK, ALPHA = 4, 8.0


def _blocks(model) -> dict[str, torch.nn.Module]:
    """``{host name: block}`` of adapter ``default``."""
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return {n: m.hcp_lora_blocks["default"] for n, m in root.named_modules() if hasattr(m, "hcp_lora_blocks")}


def _pair(unet, dropout: float = 0.0):
    """(peft-hcp DoRA, PEFT DoRA) on copies of ``unet`` with identical random weights and magnitudes."""
    reference = copy.deepcopy(unet)
    ours = get_peft_model(
        unet,
        HcpLoraConfig(target_modules=TARGETS, r=RANK, alpha=ALPHA, dropout=dropout, use_dora=True, init_weights=False),
    )
    hosts = list(ours.base_model.targeted_module_names)
    reference = get_peft_model(
        reference,
        LoraConfig(
            target_modules=hosts, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=True, init_lora_weights=False
        ),
    )
    for name, block in _blocks(ours).items():
        layer = reference.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(block.lora_down.weight)
            layer.lora_B["default"].weight.copy_(block.lora_up.weight)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(block.dora_scale.reshape(magnitude.shape))
    return ours, reference


def test_magnitude_is_the_norm_of_the_adapted_weight(unet):
    """As PEFT: ``‖W + ΔW‖`` per output channel at creation, so a fresh DoRA computes what its LoRA does."""
    fresh = get_peft_model(copy.deepcopy(unet), HcpLoraConfig(target_modules=TARGETS, use_dora=True))
    peft = get_peft_model(
        copy.deepcopy(unet), LoraConfig(target_modules=list(fresh.base_model.targeted_module_names), use_dora=True)
    )
    for name, block in _blocks(fresh).items():  # init: ΔW = 0, both give ‖W‖
        magnitude = peft.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(block.dora_scale.flatten(), magnitude.flatten(), atol=1e-6, rtol=1e-6)
    random = get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, use_dora=True, init_weights=False))
    convs = 0
    for name, block in _blocks(random).items():
        host = random.base_model.model.get_submodule(name).get_base_layer()
        delta = (block.lora_up.weight.flatten(1) @ block.lora_down.weight.flatten(1)) * block.scaling
        expected = (host.weight.flatten(1) + delta).norm(dim=1)
        assert block.dora_scale.shape == (host.weight.shape[0],) + (1,) * (host.weight.dim() - 1)
        torch.testing.assert_close(block.dora_scale.flatten(), expected, atol=1e-6, rtol=1e-6)
        convs += host.weight.dim() == 4
    assert convs > 0


def test_dora_matches_peft_dora(unet, unet_batch):
    ours, reference = _pair(unet)
    actual, expected = unet_out(ours, unet_batch), unet_out(reference, unet_batch)
    with ours.disable_adapter():
        assert (actual - unet_out(ours, unet_batch)).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_dora_training_step_matches_peft_with_dropout(unet, unet_batch):
    """Dropout on: the host part is recomputed from the dropped input, and the norm takes no gradient."""
    ours, reference = _pair(unet, dropout=0.3)
    results = []
    for model in (ours, reference):
        model.train()
        torch.manual_seed(0)
        loss = model(*unet_batch).sample.square().mean()
        loss.backward()
        results.append(loss.detach())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)
    for name, block in _blocks(ours).items():
        layer = reference.base_model.model.get_submodule(name)
        grads = {
            "dora_scale": (block.dora_scale.grad, layer.lora_magnitude_vector["default"].weight.grad),
            "lora_up": (block.lora_up.weight.grad, layer.lora_B["default"].weight.grad),
            "lora_down": (block.lora_down.weight.grad, layer.lora_A["default"].weight.grad),
        }
        for key, (mine, theirs) in grads.items():
            torch.testing.assert_close(mine.flatten(), theirs.flatten(), atol=1e-6, rtol=1e-4, msg=f"{name} {key}")


def test_merge_unmerge_unload(unet, unet_batch):
    ours, reference = _pair(unet)
    original = {n: p.clone() for n, p in ours.base_model.model.named_parameters() if "hcp_lora" not in n}
    unmerged = unet_out(ours, unet_batch)
    ours.merge_adapter()
    torch.testing.assert_close(unet_out(ours, unet_batch), unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    restored = dict(ours.base_model.model.named_parameters())
    assert all(torch.equal(restored[n], p) for n, p in original.items())
    torch.testing.assert_close(unet_out(ours, unet_batch), unmerged, atol=0, rtol=0)
    unloaded, pristine = copy.deepcopy(ours).unload().state_dict(), tiny_unet().state_dict()  # unload, unmerged
    assert unloaded.keys() == pristine.keys() and all(torch.equal(unloaded[n], p) for n, p in pristine.items())
    merged_ours, merged_peft = ours.merge_and_unload().state_dict(), reference.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_peft.keys()
    for key, value in merged_peft.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-5, rtol=0)


def test_save_and_from_pretrained_round_trip(unet, unet_batch, tmp_path):
    ours, _ = _pair(unet)
    with torch.no_grad():  # a trained magnitude, not the one a fresh block computes
        for block in _blocks(ours).values():
            block.dora_scale.mul_(1.5)
    out = unet_out(ours, unet_batch)
    ours.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(unet_out(loaded, unet_batch), out, atol=0, rtol=0)


def _dora_unet(alpha: float = 3.0):
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=TARGETS, alpha=alpha, use_dora=True, init_weights=False), "a")
    with torch.no_grad():
        for module in unet.modules():
            if hasattr(module, "hcp_lora_blocks"):
                module.hcp_lora_blocks["a"].dora_scale.mul_(1.25)
    return unet


def test_kohya_round_trip(unet_batch, tmp_path):
    unet = _dora_unet()
    out = unet_out(unet, unet_batch)
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # 64 x 32 x 3 x 3
    assert tensors[f"{conv}.dora_scale"].shape == (64, 1, 1, 1)  # LyCORIS's layout (wd_on_out)
    fresh = tiny_unet()
    import_kohya(fresh, str(tmp_path / "net.safetensors"))
    assert fresh.peft_config["default"].use_dora
    torch.testing.assert_close(unet_out(fresh, unet_batch), out, atol=0, rtol=0)
    again = export_kohya(fresh, str(tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="no exact form in diffusers"):
        export_diffusers(fresh, str(tmp_path / "diffusers"))


def test_kohya_import_takes_peft_layout_and_layers_without_magnitude(unet_batch, tmp_path):
    """diffusers' converter hands ``dora_scale`` to PEFT as its magnitude (``(out,)``, ``(1, out, 1, 1)``); and a
    layer of a DoRA file that has none is plain LoRA."""
    unet = _dora_unet()
    out = unet_out(unet, unet_batch)
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    peft_layout = {
        k: (v.reshape(1, -1, 1, 1) if v.dim() == 4 else v.flatten()) if k.endswith("dora_scale") else v
        for k, v in tensors.items()
    }
    save_file(peft_layout, str(tmp_path / "peft_layout.safetensors"))
    fresh = tiny_unet()
    import_kohya(fresh, str(tmp_path / "peft_layout.safetensors"))
    torch.testing.assert_close(unet_out(fresh, unet_batch), out, atol=0, rtol=0)

    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    partial = {k: v for k, v in tensors.items() if k != f"{layer}.dora_scale"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    mixed = tiny_unet()
    import_kohya(mixed, str(tmp_path / "partial.safetensors"))
    block = mixed.get_submodule(kohya_name_table(mixed, "lora_unet")[layer]).hcp_lora_blocks["default"]
    host = block._dora_host
    torch.testing.assert_close(
        block.merged_weight(host.weight), host.weight + block.get_delta_weight(), atol=1e-6, rtol=0
    )


def test_kohya_import_refuses_input_side_magnitude(tmp_path):
    layer = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"  # 64 out, 32 in
    tensors = {
        f"{layer}.lora_down.weight": torch.randn(4, 32, 1, 1),
        f"{layer}.lora_up.weight": torch.randn(64, 4, 1, 1),
        f"{layer}.dora_scale": torch.rand(1, 32, 1, 1),
        f"{layer}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(tmp_path / "in_side.safetensors"))
    unet = tiny_unet()
    with pytest.raises(CheckpointError, match="conv_shortcut.*wd_on_out=False"):
        import_kohya(unet, str(tmp_path / "in_side.safetensors"))
    assert not hasattr(unet, "peft_config")


def test_config_refuses_dora_with_a_lora_bias():
    with pytest.raises(ValueError, match="use_dora"):
        HcpLoraConfig(target_modules=["conv_in"], use_dora=True, bias=True)


def test_lycoris_applies_our_file_the_same(unet_batch, tmp_path):
    unet = _dora_unet()
    out = unet_out(unet, unet_batch)
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    reference = tiny_unet()
    network = lycoris_network(tensors, reference)
    assert all(module.wd and module.wd_on_out for module in network.loras)
    network.apply_to()
    torch.testing.assert_close(unet_out(reference, unet_batch), out, atol=1e-5, rtol=0)
