"""Files LyCORIS itself writes (``create_lycoris`` + ``save_weights``), whose layers differ in rank, alpha or
structure: each imports as one adapter (per-layer patterns) that computes LyCORIS's output, and exports back to
the same file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_hcp import HcpLokrConfig
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.errors import CheckpointError
from peft_hcp.hub import attach
from peft_hcp.hub.interchange import export_kohya, import_kohya
from tests.helpers import assert_model_unchanged, lycoris_network, model_snapshot, tiny_pipeline, unet_out


lycoris = pytest.importorskip("lycoris.wrapper")

CASES = {
    # LyCORIS's defaults (rank 4, alpha 1): w2 full on the small layers, decomposed on the others
    "lokr-defaults": ("lokr", {}),
    # another rank and alpha on the convolutions, as sd-scripts' conv_dim / conv_alpha give
    "lokr-conv-dim": ("lokr", {"linear_dim": 2, "linear_alpha": 1, "conv_dim": 8, "conv_alpha": 4}),
    "lokr-decompose-both-cp": (
        "lokr",
        {"linear_dim": 2, "linear_alpha": 2, "decompose_both": True, "use_tucker": True},
    ),
    "lokr-factor": ("lokr", {"linear_dim": 2, "factor": 2}),
    "lokr-full-matrix": ("lokr", {"linear_dim": 2, "full_matrix": True}),
    "lora-conv-dim": ("lora", {"linear_dim": 2, "linear_alpha": 1, "conv_dim": 4, "conv_alpha": 3}),
    "loha-conv-dim": ("loha", {"linear_dim": 2, "linear_alpha": 1, "conv_dim": 4, "conv_alpha": 3}),
}


def _layouts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """``{layer: its tensor names and shapes}``."""
    layouts: dict[str, list] = {}
    for key, value in tensors.items():
        layer, _, name = key.partition(".")
        layouts.setdefault(layer, []).append((name, tuple(value.shape)))
    return {layer: tuple(sorted(parts)) for layer, parts in layouts.items()}


def _lycoris_file(
    algo: str, settings: dict, path: str, kohya_names: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random network LyCORIS makes on the tiny UNet, saved by LyCORIS (which names a bare model's layers
    ``lycoris_…``), then under kohya's UNet names unless ``kohya_names`` is false; its tensors and the UNet's
    output with LyCORIS's network applied."""
    torch.manual_seed(0)
    reference = tiny_unet()
    network = lycoris.create_lycoris(reference, 1.0, algo=algo, **settings)
    network.apply_to()
    with torch.no_grad():  # LyCORIS starts with one factor at zero: give every weight a value
        for param in network.parameters():
            param.normal_(std=0.2)
    network.save_weights(path, None, None)
    tensors = load_file(path)
    if kohya_names:
        tensors = {key.replace("lycoris_", "lora_unet_", 1): value for key, value in tensors.items()}
        save_file(tensors, path)
    return tensors, unet_out(reference, unet_inputs())


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_file_imports_as_one_adapter_and_exports_back(case, tmp_path):
    path = str(tmp_path / "lycoris.safetensors")
    written, expected = _lycoris_file(*CASES[case], path)
    assert (expected - unet_out(tiny_unet(), unet_inputs())).abs().max() > 1e-3
    if case == "lokr-defaults":  # the file that needs per-layer structure
        forms = {tuple(name for name, _ in layout) for layout in _layouts(written).values()}
        assert {("alpha", "lokr_w1", "lokr_w2"), ("alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b")} <= forms

    unet = tiny_unet()
    import_kohya(unet, path)
    assert list(unet.peft_config) == ["default"]  # one adapter, however many ranks and structures
    torch.testing.assert_close(unet_out(unet, unet_inputs()), expected, atol=1e-5, rtol=0)
    exported = export_kohya(unet, str(tmp_path / "again.safetensors"))
    assert _layouts(exported) == _layouts(written)  # every layer in LyCORIS's own layout
    for key, value in written.items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_per_layer_ranks_become_rank_pattern_not_padding(tmp_path):
    """A LoRA file with other ranks on the convolutions gives blocks of the file's ranks, through ``rank_pattern``
    and ``alpha_pattern`` (PEFT's fields), rather than zero-padded blocks of one rank."""
    path = str(tmp_path / "lora.safetensors")
    _lycoris_file("lora", CASES["lora-conv-dim"][1], path)
    unet = tiny_unet()
    import_kohya(unet, path)
    config = unet.peft_config["default"]
    assert (config.r, config.alpha) in {(2, 1.0), (4, 3.0)}
    assert set(config.rank_pattern.values()) | {config.r} == {2, 4}
    assert set(config.alpha_pattern.values()) | {config.alpha} == {1.0, 3.0}
    for name, module in unet.named_modules():
        if hasattr(module, "hcp_lora_blocks"):
            block = module.hcp_lora_blocks["default"]
            kernel = module.get_base_layer().weight.shape[2:]
            assert block.rank == (4 if any(k != 1 for k in kernel) else 2), name


def test_lycoris_loads_an_exported_adapter_with_patterns(tmp_path):
    """The other way: an adapter made here with per-layer ranks, alphas and structures, exported, is what
    LyCORIS's own loader (``create_lycoris_from_weights``) builds and runs (Linear layers: its loader guesses
    convolution shapes from the tensors)."""
    unet = tiny_unet()
    config = HcpLokrConfig(
        target_modules=["re:.*(attn.|ff)$"],
        init_weights=False,
        r=2,
        alpha=3.0,
        rank_pattern={"to_q": 3},
        alpha_pattern={"to_v": 1.0},
        structure_pattern={"to_k": {"full_matrix": True}, "ff.net.0.proj": {"decompose_both": True}},
    )
    attach(unet, config, "a")
    out = unet_out(unet, unet_inputs())
    tensors = export_kohya(unet, str(tmp_path / "net.safetensors"))
    forms = {tuple(name for name, _ in layout) for layout in _layouts(tensors).values()}
    assert {
        ("alpha", "lokr_w1", "lokr_w2"),
        ("alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b"),
        ("alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
    } <= forms
    reference = tiny_unet()
    lycoris_network(tensors, reference).apply_to()
    torch.testing.assert_close(unet_out(reference, unet_inputs()), out, atol=1e-5, rtol=0)


def test_a_file_as_lycoris_names_a_bare_model_goes_on_the_component_it_fits(tmp_path):
    """``lycoris_<module path>``: LyCORIS's names for the model it wrapped, on a bare UNet or the pipeline's UNet."""
    path = str(tmp_path / "lycoris.safetensors")
    written, expected = _lycoris_file("lokr", {}, path, kohya_names=False)
    assert all(key.startswith("lycoris_") for key in written)
    layers = {key.partition(".")[0] for key in written}
    unet = tiny_unet()
    assert list(import_kohya(unet, path)) == ["unet"]
    assert {f"lycoris_{name.replace('.', '_')}" for name in unet.peft_config["default"].target_modules} == layers
    torch.testing.assert_close(unet_out(unet, unet_inputs()), expected, atol=1e-5, rtol=0)
    pipe = tiny_pipeline()
    pipe.unet.load_state_dict(tiny_unet().state_dict())
    placed = import_kohya(pipe, path)
    assert list(placed) == ["unet"] and len(placed["unet"]) == len(layers)
    torch.testing.assert_close(unet_out(pipe.unet, unet_inputs()), expected, atol=1e-5, rtol=0)


def test_lycoris_layers_that_fit_no_component_are_refused_by_name(tmp_path):
    path = str(tmp_path / "lycoris.safetensors")
    written, _ = _lycoris_file("lora", {"linear_dim": 2}, path, kohya_names=False)
    layer = next(iter(written)).partition(".")[0]
    save_file(
        {**written, **{k.replace(layer, "lycoris_no_such_layer"): v.clone() for k, v in written.items() if layer in k}},
        path,
    )
    unet = tiny_unet()
    before = model_snapshot(unet, lambda m: unet_out(m, unet_inputs()))
    with pytest.raises(
        CheckpointError, match=r"1 LyCORIS layer\(s\) match no layer of this unet: lycoris_no_such_layer\."
    ):
        import_kohya(unet, path)
    assert_model_unchanged(before, unet)
