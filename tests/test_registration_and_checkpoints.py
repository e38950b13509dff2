"""Registration with PEFT, user-defined plugins, and what loading refuses (wrong shapes, bad files, pickle)."""

import importlib
import json
import sys
from dataclasses import dataclass

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_hcp
from peft_hcp import CheckpointError, HcpLoraConfig, HcpSingleConfig
from peft_hcp.embedded import tiny_unet
from peft_hcp.registry import register_tuner
from tests.helpers import run_python, unet_out


TARGETS = ["re:.*attn.?$", "re:.*ff$"]


def test_types_are_peft_enum_members_and_registration_is_idempotent():
    assert PeftType("HCP_LORA") is PeftType.HCP_LORA and PeftType.HCP_LORA.value == "HCP_LORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HCP_LORA] is HcpLoraConfig
    model_cls = PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HCP_LORA]
    assert register_tuner("hcp_lora", HcpLoraConfig, model_cls) is PeftType.HCP_LORA  # again: no error
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HCP_LORA] is HcpLoraConfig


def test_a_taken_name_cannot_be_claimed_by_another_class():
    @dataclass
    class Impostor(HcpSingleConfig):
        pass

    model_cls = PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HCP_LORA]
    with pytest.raises(KeyError, match="already registered"):
        register_tuner("hcp_lora", Impostor, model_cls)


def test_saved_config_names_its_type_and_version(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HCP_LORA"
    assert saved["peft_hcp_version"] == peft_hcp.__version__
    assert saved["target_modules"] == TARGETS  # the user's selectors, in order, not PEFT's rewrite


def test_many_selectors_are_saved_unmangled(unet, tmp_path):
    """PEFT condenses >= 20 target_modules in place; that must not touch the saved selectors."""
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)][:30]
    selectors = [f"re:{n.replace('.', '[.]')}" for n in names]
    model = get_peft_model(unet, HcpLoraConfig(target_modules=selectors))
    assert len(model.base_model.targeted_module_names) == 30
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == selectors


def test_without_import_peft_names_the_missing_type(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    result = run_python(f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})", check=False)
    assert result.returncode != 0 and "HCP_LORA" in result.stderr
    result = run_python(
        f"import peft_hcp; from peft import PeftConfig; print(PeftConfig.from_pretrained({str(tmp_path)!r}).peft_type)"
    )
    assert "HCP_LORA" in result.stdout


def test_config_file_cannot_name_an_arbitrary_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "HCP_EVIL", "target_modules": ["x"]}))
    with pytest.raises(KeyError, match="HCP_EVIL"):
        PeftConfig.from_pretrained(tmp_path)


PLUGIN_SOURCE = '''
from dataclasses import dataclass, field
import torch
from torch import nn
from peft_hcp import HcpSingleConfig, SinglePluginBlock, register_single_plugin


class GainBlock(SinglePluginBlock):
    """A user plugin written as in the HCP seed: wrapable_classes and forward(fea_in, fea_out)."""

    wrapable_classes = (nn.Linear,)

    def __init__(self, host, config):
        super().__init__(host, config)
        self.gain = nn.Parameter(torch.full((host.out_features,), config.start))

    def forward(self, fea_in, fea_out):
        return fea_out * (1 + self.gain)


@register_single_plugin("hcp_gain", GainBlock)
@dataclass
class HcpGainConfig(HcpSingleConfig):
    start: float = field(default=0.0)
'''


def test_user_plugin_gets_config_save_and_load_for_free(tmp_path, unet_batch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        my_plugin = importlib.reload(importlib.import_module("my_plugin"))  # re-registering on reload is fine
    finally:
        sys.path.remove(str(tmp_path))
    model = get_peft_model(tiny_unet(), my_plugin.HcpGainConfig(target_modules=["re:.*attn1$"], start=0.25))
    expected = unet_out(model, unet_batch)
    assert not torch.equal(expected, unet_out(tiny_unet(), unet_batch))
    model.save_pretrained(tmp_path / "adapter")
    run_python(
        """
        import torch, my_plugin
        from peft import PeftModel
        from safetensors.torch import save_file
        from peft_hcp.embedded import tiny_unet, unet_inputs
        model = PeftModel.from_pretrained(tiny_unet(), "adapter")
        with torch.no_grad():
            save_file({"out": model(*unet_inputs()).sample}, "out.safetensors")
        """,
        cwd=tmp_path,
    )
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


def _other_shape_unet() -> UNet2DConditionModel:
    config = dict(tiny_unet().config)
    config["block_out_channels"] = (16, 32)
    return UNet2DConditionModel(**config)


def test_loading_onto_another_shape_names_layer_and_shapes(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS, init_weights=False)).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"another shape.*attn1\.to_q\.hcp_lora_blocks\.lora_down\.weight: checkpoint \(4, 32\) vs model \(4, 16\)",
    ):
        PeftModel.from_pretrained(_other_shape_unet(), tmp_path)


def test_loading_onto_another_architecture_lists_missing_weights(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    config = dict(tiny_unet().config)
    config["layers_per_block"] = 2
    with pytest.raises(CheckpointError, match=r"missing .*down_blocks\.0\.attentions\.1"):
        PeftModel.from_pretrained(UNet2DConditionModel(**config), tmp_path)


def test_truncated_safetensors_is_named(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is truncated"):
        PeftModel.from_pretrained(tiny_unet(), tmp_path)
    weights.write_bytes(b"\x00\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        PeftModel.from_pretrained(tiny_unet(), tmp_path)


class _Trap:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_without_unpickling(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    witness = tmp_path / "pickle_was_executed"
    torch.save({"trap": _Trap(str(witness))}, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin, a pickle"):
        PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert not witness.exists()


def test_the_weights_file_a_config_was_read_with_is_never_saved(unet, tmp_path):
    get_peft_model(unet, HcpLoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "checkpoint_file" not in written
    written["checkpoint_file"] = str(tmp_path / "elsewhere.safetensors")  # a file cannot point it elsewhere
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(written))
    with pytest.warns(UserWarning, match="checkpoint_file"):
        config = HcpLoraConfig.from_pretrained(str(tmp_path / "a"))
    assert config.checkpoint_file == str(tmp_path / "a" / "adapter_model.safetensors")
    config.save_pretrained(str(tmp_path / "b"))
    assert "checkpoint_file" not in json.loads((tmp_path / "b" / "adapter_config.json").read_text())
