"""HcpLokr computes what PEFT's LoKr and LyCORIS compute, merges exactly, and round-trips through files."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoKrConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from peft_hcp import CheckpointError, HcpLokrConfig
from peft_hcp.embedded import tiny_unet
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import export_kohya, import_kohya
from tests.helpers import lycoris_network, unet_out


# every Linear and Conv2d (3x3, 1x1 and the 4-channel conv_in) of the tiny UNet
EVERYTHING = [""]
STRUCTURES = {
    # low-rank w1 and w2, CP cores on the 3x3 convolutions, full factors on small sides
    "decomposed": {"r": 2, "alpha": 3.0, "decompose_both": True, "use_effective_conv2d": True},
    # full w1 and w2 on most layers; w1 of side 2 (a factor whose square exceeds a side, 4 on conv_in,
    # is where PEFT's factorization and current LyCORIS's differ: PEFT's is followed)
    "full": {"r": 8, "alpha": 4.0, "decompose_factor": 2},
}


def _blocks(model) -> dict[str, torch.nn.Module]:
    """``{host name: block}`` of adapter ``default``."""
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return {
        name: module.hcp_lokr_blocks["default"]
        for name, module in root.named_modules()
        if hasattr(module, "hcp_lokr_blocks") and "default" in module.hcp_lokr_blocks
    }


def _pair(unet, fields: dict):
    """(peft-hcp model, PEFT LoKr model) on copies of ``unet``, with identical random weights."""
    reference = copy.deepcopy(unet)
    ours = get_peft_model(unet, HcpLokrConfig(target_modules=EVERYTHING, init_weights=False, **fields))
    hosts = list(ours.base_model.targeted_module_names)
    peft_fields = {k: v for k, v in fields.items() if k != "alpha_auto_scale"}
    reference = get_peft_model(reference, LoKrConfig(target_modules=hosts, init_weights=False, **peft_fields))
    for name, block in _blocks(ours).items():
        layer = reference.base_model.model.get_submodule(name)
        theirs = {n: getattr(layer, n)["default"] for n in layer.adapter_layer_names if "default" in getattr(layer, n)}
        assert {n: p.shape for n, p in theirs.items()} == {n: p.shape for n, p in block.named_parameters()}, name
        for param_name, param in theirs.items():
            param.data.copy_(block.get_parameter(param_name))
    return ours, reference


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_lokr_matches_peft_lokr(unet, unet_batch, structure):
    ours, reference = _pair(unet, STRUCTURES[structure])
    blocks = _blocks(ours)
    assert any(isinstance(ours.base_model.model.get_submodule(n).get_base_layer(), torch.nn.Conv2d) for n in blocks)
    expected = unet_out(reference, unet_batch)
    actual = unet_out(ours, unet_batch)
    with ours.disable_adapter():
        assert (actual - unet_out(ours, unet_batch)).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    for name, block in blocks.items():
        layer = reference.base_model.model.get_submodule(name)
        torch.testing.assert_close(block.get_delta_weight(), layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_structures_cover_every_form(unet):
    """The two configurations above reach each LoKr form LyCORIS writes (so the other tests cover them)."""
    forms = set()
    for fields in STRUCTURES.values():
        model = get_peft_model(copy.deepcopy(unet), HcpLokrConfig(target_modules=EVERYTHING, **fields))
        forms |= {tuple(sorted(block._parameters)) for block in _blocks(model).values()}
    assert {
        ("lokr_w1", "lokr_w2"),
        ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
        ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
        ("lokr_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
    } <= forms


@pytest.mark.parametrize(("init", "zero"), [(True, "w1"), ("lycoris", "w2")])
def test_init_weights_zero_the_same_factor_as_peft(unet, unet_batch, init, zero):
    fields = {"r": 2, "decompose_both": True}
    base = unet_out(unet, unet_batch)
    ours = get_peft_model(copy.deepcopy(unet), HcpLokrConfig(target_modules=EVERYTHING, init_weights=init, **fields))
    hosts = list(ours.base_model.targeted_module_names)
    reference = get_peft_model(copy.deepcopy(unet), LoKrConfig(target_modules=hosts, init_weights=init, **fields))
    torch.testing.assert_close(unet_out(ours, unet_batch), base, atol=0, rtol=0)
    for name, block in _blocks(ours).items():
        layer = reference.base_model.model.get_submodule(name)
        zeroed = {n for n, p in block.named_parameters() if not p.any()}
        assert zeroed and all(n.startswith(f"lokr_{zero}") for n in zeroed), (name, zeroed)
        assert zeroed == {
            n
            for n in layer.adapter_layer_names
            if "default" in getattr(layer, n) and not getattr(layer, n)["default"].any()
        }


def test_merge_unmerge_unload_restore_exactly(unet, unet_batch):
    ours, reference = _pair(unet, STRUCTURES["decomposed"])
    original = {n: p.clone() for n, p in ours.base_model.model.named_parameters() if "lokr" not in n}
    unmerged = unet_out(ours, unet_batch)
    ours.merge_adapter()
    torch.testing.assert_close(unet_out(ours, unet_batch), unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    assert all(torch.equal(p, original[n]) for n, p in ours.base_model.model.named_parameters() if n in original)
    torch.testing.assert_close(unet_out(ours, unet_batch), unmerged, atol=0, rtol=0)

    unloaded, pristine = copy.deepcopy(ours).unload().state_dict(), tiny_unet().state_dict()  # unload, unmerged
    assert unloaded.keys() == pristine.keys() and all(torch.equal(unloaded[n], p) for n, p in pristine.items())
    merged_ours = ours.merge_and_unload().state_dict()
    merged_peft = reference.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_peft.keys()
    for key, value in merged_peft.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-5, rtol=0)


def test_save_and_from_pretrained_round_trip(unet, unet_batch, tmp_path):
    model = get_peft_model(
        unet, HcpLokrConfig(target_modules=EVERYTHING, init_weights=False, **STRUCTURES["decomposed"])
    )
    out = unet_out(model, unet_batch)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    assert loaded.peft_config["default"].use_effective_conv2d and loaded.peft_config["default"].decompose_both
    torch.testing.assert_close(unet_out(loaded, unet_batch), out, atol=0, rtol=0)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_kohya_round_trip(unet, unet_batch, tmp_path, structure):
    attach(unet, HcpLokrConfig(target_modules=EVERYTHING, init_weights=False, **STRUCTURES[structure]), "a")
    out = unet_out(unet, unet_batch)
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    assert "lora_unet_conv_in.lokr_w1" in tensors
    fresh = tiny_unet()
    import_kohya(fresh, str(tmp_path / "net.safetensors"))
    config = fresh.peft_config["default"]
    for field_name in ("decompose_both", "use_effective_conv2d", "decompose_factor"):
        assert getattr(config, field_name) == getattr(unet.peft_config["a"], field_name)
    # a layer of two full factors carries its scale in lokr_w1 (LyCORIS ignores alpha there): 1 ulp apart
    torch.testing.assert_close(unet_out(fresh, unet_batch), out, atol=1e-6, rtol=0)
    again = export_kohya(fresh, str(tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_import_refuses_a_layer_of_another_structure(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 x 32: sides 4 x 8
    other = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors = {
        f"{key}.lokr_w1": torch.randn(4, 4),
        f"{key}.lokr_w2_a": torch.randn(8, 2),
        f"{key}.lokr_w2_b": torch.randn(2, 8),
        f"{key}.alpha": torch.tensor(2.0),
        f"{other}.lokr_w1": torch.randn(4, 4),
        f"{other}.lokr_w2_a": torch.randn(8, 6),  # decomposed at rank 6, where LyCORIS keeps an 8 x 8 w2 full
        f"{other}.lokr_w2_b": torch.randn(6, 8),
        f"{other}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    unet = tiny_unet()
    with pytest.raises(CheckpointError, match="attn1_to_k.*lokr_w2"):
        import_kohya(unet, str(tmp_path / "odd.safetensors"))
    assert not hasattr(unet, "peft_config")


# -- LyCORIS itself, where installed -----------------------------------------------------------------


def test_matches_lycoris_modules(unet, unet_batch, tmp_path):
    """LyCORIS's LokrModule, built from the same hyperparameters and given the exported tensors, computes
    our output; its structure rules and its scale (1 for two full factors) included."""
    lokr = pytest.importorskip("lycoris.modules.lokr")
    outputs = {}
    for structure, fields in STRUCTURES.items():
        model = copy.deepcopy(unet)
        attach(model, HcpLokrConfig(target_modules=EVERYTHING, init_weights=False, **fields), "a")
        outputs[structure] = unet_out(model, unet_batch)
        tensors = export_kohya(model, str(tmp_path / f"{structure}.safetensors"))
        reference = copy.deepcopy(unet)
        names = {key.split(".")[0]: key.split(".")[0][len("lora_unet_") :] for key in tensors}
        table = {n.replace(".", "_"): n for n, _ in reference.named_modules()}
        modules = []
        for layer, flat in names.items():
            host = reference.get_submodule(table[flat])
            module = lokr.LokrModule(
                layer,
                host,
                1.0,
                lora_dim=fields["r"],
                alpha=fields["alpha"],
                use_tucker=fields.get("use_effective_conv2d", False),
                decompose_both=fields.get("decompose_both", False),
                factor=fields.get("decompose_factor", -1),
            )
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(layer + ".")}
            theirs = {n for n, _ in module.named_parameters()}
            assert theirs == set(mine) - {"alpha"}, layer
            with torch.no_grad():
                for name in theirs:
                    module.get_parameter(name).copy_(mine[name])
            modules.append(module)
        for module in modules:
            module.apply_to()
        torch.testing.assert_close(unet_out(reference, unet_batch), outputs[structure], atol=1e-5, rtol=0)


def test_lycoris_loads_our_file(unet, unet_batch, tmp_path):
    """``create_lycoris_from_weights`` on an exported file of Linear layers (its loader guesses conv shapes
    from the tensors and misreads a folded 3x3 kernel, so convolutions are checked by the test above)."""
    attach(
        unet,
        HcpLokrConfig(target_modules=["re:.*(attn.|ff)$"], init_weights=False, r=2, alpha=3.0, decompose_both=True),
        "a",
    )
    out = unet_out(unet, unet_batch)
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    reference = tiny_unet()
    lycoris_network(tensors, reference).apply_to()
    torch.testing.assert_close(unet_out(reference, unet_batch), out, atol=1e-5, rtol=0)
