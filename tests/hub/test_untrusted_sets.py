"""A downloaded adapter set is data: it can never make peft-hcp read, write or allocate outside what it is.

Manifests naming folders outside the set (``..``, absolute paths, symbolic links) or names that are paths,
configs asking for more than their weights file holds (a rank bomb, layers without weights, other shapes) and
kohya files claiming huge ranks are refused with one ``CheckpointError`` that names the file, and the models
are left exactly as they were. Saving writes only under its folder, whatever names a model carries.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_hcp import (
    CheckpointError,
    HcpControlNetConfig,
    HcpLohaConfig,
    HcpLokrConfig,
    HcpLoraConfig,
    HcpPReLUConfig,
    HcpSkipConfig,
)
from peft_hcp.embedded import tiny_unet
from peft_hcp.hub import attach, load_adapter, read_set, save_adapter
from peft_hcp.hub.interchange import export_kohya
from tests.helpers import assert_model_unchanged, model_snapshot, run_python
from tests.hub.set_models import LORA_TARGETS, adapted_models, bare_models


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """``set`` (the valid set), ``victim`` (another valid set beside it, with other weights)."""
    root = tmp_path_factory.mktemp("sets")
    save_adapter(adapted_models(0), str(root / "set"))
    save_adapter(adapted_models(1), str(root / "victim"))
    return root


@pytest.fixture
def edited(sets, tmp_path):
    """A fresh copy of the valid set, with ``victim`` beside it, to edit."""
    shutil.copytree(sets / "set", tmp_path / "set", symlinks=True)
    shutil.copytree(sets / "victim", tmp_path / "victim", symlinks=True)
    return tmp_path / "set"


def edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_entry(folder, index: int, **changes) -> None:
    manifest = folder / "adapter_set.json"
    data = json.loads(manifest.read_text())
    data["adapters"][index].update(changes)
    manifest.write_text(json.dumps(data))


def refused_unchanged(target, folder, match: str) -> CheckpointError:
    """Load ``folder`` into ``target``: assert a ``CheckpointError`` matching ``match`` and unchanged models."""
    models = target.components.items() if hasattr(target, "components") else [("", target)]
    before = {name: model_snapshot(model) for name, model in models}
    with pytest.raises(CheckpointError, match=match) as info:
        load_adapter(target, str(folder))
    for name, model in models:
        assert_model_unchanged(before[name], model)
    return info.value


# -- reading only inside the set ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subfolder",
    [
        "../victim/unet/lora",
        "{victim}/unet/lora",
        "unet/../../victim/unet/lora",
        "C:\\victim",
        "unet\\lora",
        "./unet/lora",
    ],
)
def test_a_subfolder_outside_the_set_is_refused(edited, subfolder):
    edit_entry(edited, 0, subfolder=subfolder.format(victim=edited.parent / "victim"))
    error = refused_unchanged(bare_models(), edited, "entry 0, field 'subfolder'")
    assert str(edited / "adapter_set.json") in str(error)


def test_a_leaf_folder_linking_outside_the_set_is_refused(edited):
    shutil.rmtree(edited / "unet" / "lora")
    os.symlink(edited.parent / "victim" / "unet" / "lora", edited / "unet" / "lora")
    refused_unchanged(bare_models(), edited, r"entry 0, field 'subfolder'.*outside the set")
    os.remove(edited / "adapter_set.json")  # found by walking the folders: the link is not followed
    assert "unet/lora" not in {entry.subfolder for entry in read_set(str(edited))}


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_leaf_file_linking_outside_the_set_is_refused(edited, name):
    os.remove(edited / "unet" / "loha" / name)
    os.symlink(edited.parent / "victim" / "unet" / "loha" / name, edited / "unet" / "loha" / name)
    refused_unchanged(bare_models(), edited, "outside the adapter set")


def test_a_hub_cache_snapshot_whose_files_link_to_blobs_loads(sets, tmp_path):
    """The Hub cache keeps a snapshot's files as links into the repo's ``blobs`` folder: inside what was downloaded."""
    repo = tmp_path / "models--user--set"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted((sets / "set").rglob("*")):
        if path.is_file():
            blob = repo / "blobs" / f"{len(os.listdir(repo / 'blobs')):04d}"
            shutil.copyfile(path, blob)
            link = snapshot / path.relative_to(sets / "set")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    target = bare_models()
    assert len(load_adapter(target, str(snapshot))) == 5


def test_every_entry_names_a_leaf_folder_once(edited):
    edit_entry(edited, 1, subfolder="unet/nothing")
    refused_unchanged(bare_models(), edited, r"entry 1, field 'subfolder'.*no adapter folder")
    edit_entry(edited, 1, subfolder="unet/lora")
    refused_unchanged(bare_models(), edited, r"entry 1, field 'subfolder'.*repeats entry 0")


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "peft-hcp-adapter-set", "version": 2, "adapters": []},
        {"format": "peft-hcp-adapter-set", "version": 1, "adapters": "unet"},
        {"format": "peft-hcp-adapter-set", "version": 1, "adapters": [["unet", "lora"]]},
        {"format": "peft-hcp-adapter-set", "version": 1, "adapters": [{"component": "unet"}]},
        [1, 2, 3],
    ],
)
def test_a_malformed_manifest_is_one_checkpoint_error(edited, manifest):
    (edited / "adapter_set.json").write_text(json.dumps(manifest))
    refused_unchanged(bare_models(), edited, "adapter_set.json")


def test_a_truncated_manifest_is_a_checkpoint_error(edited):
    text = (edited / "adapter_set.json").read_text()
    (edited / "adapter_set.json").write_text(text[: len(text) // 2])
    refused_unchanged(bare_models(), edited, "not a valid JSON file")


# -- names are names, never paths -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/some/abs/path", "../evil", "a/b", "a\\b", "", "x" * 5000, "tab\tname", "a.b", 7])
def test_a_manifest_name_that_is_not_a_plain_name_is_refused(edited, name):
    edit_entry(edited, 0, name=name)
    refused_unchanged(bare_models(), edited, "entry 0, field 'name'")


@pytest.mark.parametrize("component", ["../unet", "vae", "", 3])
def test_a_manifest_component_must_carry_adapters(edited, component):
    edit_entry(edited, 0, component=component)
    refused_unchanged(bare_models(), edited, "entry 0|holds adapters for")


def test_a_folder_name_that_is_not_a_plain_name_is_refused(edited):
    os.remove(edited / "adapter_set.json")
    os.rename(edited / "unet" / "lora", edited / "unet" / "lo.ra")
    refused_unchanged(bare_models(), edited, r"lo\.ra.*not a plain adapter name")


@pytest.mark.parametrize("name", ["/some/abs/path", "../evil", "a/b", "", "x" * 5000, "c:d"])
def test_every_attach_route_refuses_a_name_that_is_not_plain(name):
    config = HcpLoraConfig(target_modules=LORA_TARGETS)
    unet = tiny_unet()
    before = model_snapshot(unet)
    with pytest.raises(ValueError, match="Adapter name"):
        attach(unet, config, name)
    with pytest.raises(ValueError, match="Adapter name"):
        unet.add_adapter(config, name)
    with pytest.raises(ValueError, match="Adapter name"):
        get_peft_model(unet, config, adapter_name=name)
    assert_model_unchanged(before, unet)
    model = get_peft_model(tiny_unet(), config)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="Adapter name"):
        model.add_adapter(name, config)
    assert_model_unchanged(before, model)


def test_save_writes_nothing_for_a_name_that_is_a_path(tmp_path):
    """A model that carries a path as a name (put there by hand, past every attach check) saves nothing."""
    unet = tiny_unet()
    attach(unet, HcpLoraConfig(target_modules=LORA_TARGETS), "lora")
    escaped = tmp_path / "escaped"
    unet.peft_config[str(escaped)] = unet.peft_config.pop("lora")
    with pytest.raises(ValueError, match="Adapter name"):
        save_adapter(unet, str(tmp_path / "out"))
    assert not escaped.exists() and not (tmp_path / "out").exists()


def test_save_writes_nothing_through_a_link_out_of_its_folder(tmp_path):
    """Saving into a folder that holds a link out of it (a downloaded set saved over) writes nothing."""
    target = adapted_models(0)
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    os.symlink(outside, out / "text_encoder")
    with pytest.raises(ValueError, match="outside it"):
        save_adapter(target, str(out))
    assert os.listdir(outside) == [] and os.listdir(out) == ["text_encoder"]
    os.remove(out / "text_encoder")
    os.symlink(outside / "manifest.json", out / "adapter_set.json")
    with pytest.raises(ValueError, match="adapter_set.json outside it"):
        save_adapter(target, str(out))
    assert os.listdir(outside) == []


# -- the weight file is the truth -----------------------------------------------------------------------

TARGETS = ["re:.*attn.?$", "re:.*ff$"]
CONTROLNET = dict(conditioning_embedding_out_channels=[8, 16], init_weights=False)
#: kind -> (its config, an edit of its saved config that builds other weights, what the error says)
KINDS = {
    "lora": (HcpLoraConfig(target_modules=TARGETS, init_weights=False), {"r": 8}, r"\(8, 32\)"),
    "dora": (HcpLoraConfig(target_modules=TARGETS, init_weights=False), {"use_dora": True}, "missing .*dora_scale"),
    "loha": (HcpLohaConfig(target_modules=TARGETS, init_weights=False), {"r": 2}, r"hada_w1_a: checkpoint \(32, 4\)"),
    "lokr": (
        HcpLokrConfig(target_modules=TARGETS, init_weights=False),
        {"decompose_factor": 2},
        r"lokr_w1: checkpoint \(4, 4\)",
    ),
    "skip": (
        HcpSkipConfig(from_layer=["re:.*proj_in$"], to_layer=["prehook:re:.*proj_out$"], init_weights=False),
        {"skip_bias": False},
        r"unexpected .*layer\.bias",
    ),
    "controlnet": (HcpControlNetConfig(**CONTROLNET), {"conditioning_embedding_out_channels": [8, 32]}, "vs model"),
    "patch": (HcpPReLUConfig(target_modules=["re:.*nonlinearity$"]), {"target_modules": [""]}, "missing .*act"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_that_builds_other_weights_than_the_file_is_refused_by_every_route(kind, tmp_path):
    config, change, says = KINDS[kind]
    source = tiny_unet()
    attach(source, copy.deepcopy(config), "a")
    save_adapter(source, str(tmp_path))
    edit_json(tmp_path / "adapter_config.json", **change)
    weights = str(tmp_path / "adapter_model.safetensors")
    error = refused_unchanged(tiny_unet(), tmp_path, says)
    assert weights in str(error)
    unet = tiny_unet()
    before = model_snapshot(unet)
    with pytest.raises(CheckpointError, match=says):
        PeftModel.from_pretrained(unet, str(tmp_path))
    assert_model_unchanged(before, unet)
    model = get_peft_model(tiny_unet(), copy.deepcopy(config))  # a PeftModel holds adapters of one type
    before = model_snapshot(model)
    with pytest.raises(CheckpointError, match=says):
        model.load_adapter(str(tmp_path), adapter_name="other")
    assert_model_unchanged(before, model)


def test_a_config_selecting_layers_the_file_has_no_weights_for_is_refused(edited):
    edit_json(edited / "unet" / "lora" / "adapter_config.json", target_modules=["re:.*attn1\\.to_(q|k|v)$"])
    error = refused_unchanged(bare_models(), edited, r"missing .*attn1\.to_k\.hcp_lora_blocks\.lora_down\.weight")
    assert str(edited / "unet" / "lora" / "adapter_model.safetensors") in str(error)


def test_a_header_with_other_shapes_is_refused_naming_both(edited):
    path = edited / "text_encoder" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].flatten()[None]  # the same values, another shape
    save_file(tensors, path)
    refused_unchanged(bare_models(), edited, rf"{key.removeprefix('base_model.model.')}: checkpoint \(1, \d+\)")


@pytest.mark.parametrize(
    "change, says",
    [
        ({"r": -1}, "r must be at least 1"),
        ({"r": True}, "r must be an int"),
        ({"alpha": "strong"}, "alpha must be a number"),
        ({"rank_pattern": {"to_q": -1}}, r"rank_pattern\['to_q'\]: r must be at least 1"),
        ({"alpha_pattern": ["to_q"]}, "alpha_pattern must be a dict"),
        ({"dropout": 5}, "dropout must be in"),
        ({"target_modules": 12}, "adapter_config.json"),
        ({"rank_groups": 10**9}, "too much"),
    ],
)
def test_config_values_that_make_no_adapter_are_checkpoint_errors(edited, change, says):
    leaf = "unet/loha" if "rank_groups" in change else "unet/lora"
    edit_json(edited / leaf / "adapter_config.json", **change)
    error = refused_unchanged(bare_models(), edited, says)
    assert str(edited / leaf) in str(error)


def test_a_whole_set_is_checked_before_any_leaf_is_attached(edited):
    """The text encoder's leaf comes last; its misfit leaves the UNet's four adapters unattached too."""
    edit_json(edited / "text_encoder" / "adapter_config.json", decompose_factor=2)
    target = bare_models()
    refused_unchanged(target, edited, "text_encoder")
    assert not hasattr(target.components["unet"], "peft_config")


def test_rank_bombs_are_refused_within_a_small_address_space(tmp_path):
    """``r = 2**24`` (and a kohya layer claiming that rank with zero-size tensors) under a 3 GiB address-space
    limit: building the layers dies there, the checked routes refuse before allocating."""
    fits = tiny_unet()
    attach(fits, HcpLoraConfig(target_modules=LORA_TARGETS, init_weights=False), "lora")
    save_adapter(fits, str(tmp_path / "fits"))
    shutil.copytree(tmp_path / "fits", tmp_path / "bomb")
    edit_json(tmp_path / "bomb" / "adapter_config.json", r=2**24)
    tensors = export_kohya(fits, str(tmp_path / "kohya.safetensors"))
    layer = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0].removesuffix(".lora_down.weight")
    tensors[f"{layer}.lora_down.weight"] = torch.zeros(2**24, 0)
    tensors[f"{layer}.lora_up.weight"] = torch.zeros(tensors[f"{layer}.lora_up.weight"].shape[0], 0)
    save_file(tensors, str(tmp_path / "kohya_bomb.safetensors"))
    out = run_python(
        """
        import json, resource
        import peft_hcp
        from peft import PeftModel, get_peft_model
        from peft_hcp import CheckpointError, HcpLoraConfig
        from peft_hcp.embedded import tiny_unet
        from peft_hcp.hub.interchange import import_kohya
        folder = sys.argv[1]
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        results = {}
        def attempt(route, call):
            try:
                call()
                results[route] = "loaded"
            except CheckpointError as exc:
                results[route] = "refused: " + str(exc)[:2000]
            except (MemoryError, RuntimeError) as exc:
                results[route] = "out of memory: " + str(exc)[:100]
        config = HcpLoraConfig(r=2**24, target_modules=[r"re:.*attn1\\.to_(q|v)$"])
        attempt("building", lambda: get_peft_model(tiny_unet(), config))
        attempt("peft_hcp.load_adapter", lambda: peft_hcp.load_adapter(tiny_unet(), folder + "/bomb"))
        attempt("PeftModel.from_pretrained", lambda: PeftModel.from_pretrained(tiny_unet(), folder + "/bomb"))
        model = PeftModel.from_pretrained(tiny_unet(), folder + "/fits")
        attempt("PeftModel.load_adapter", lambda: model.load_adapter(folder + "/bomb", adapter_name="b"))
        attempt("import_kohya", lambda: import_kohya(tiny_unet(), folder + "/kohya_bomb.safetensors"))
        print(json.dumps(results))
        """,
        str(tmp_path),
        timeout=280,
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results.pop("building").startswith("out of memory"), "the limit must be one that building exceeds"
    for route, result in results.items():
        assert result.startswith("refused: ") and "16777216" in result, (route, result)
    assert "lora_down.weight (16777216, 0)" in results["import_kohya"]
