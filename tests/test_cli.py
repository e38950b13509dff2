"""The ``peft-hcp`` command: it starts without torch and PEFT, and reports bad input of any command in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from peft_hcp import (
    CheckpointError,
    MergeNotSupportedError,
    SelectorMatchError,
    SelectorSyntaxError,
    UnsupportedLayerError,
)
from peft_hcp.cli import is_input_error, main
from peft_hcp.train.data import ImageFileError
from peft_hcp.train.plugins import PluginConfigError
from peft_hcp.train.settings import SettingsError
from tests.helpers import ROOT


SUBCOMMANDS = ["train", "sample", "pretrain-base", "push", "export", "import"]
HEAVY = ("torch", "peft", "diffusers", "transformers")


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root (whose code is the one installed editable)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _imported(importtime_log: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported, from its report on stderr."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", importtime_log, re.M)}


@pytest.mark.parametrize("command", [[], *([name] for name in SUBCOMMANDS)], ids=["peft-hcp", *SUBCOMMANDS])
def test_help_imports_neither_torch_nor_peft(command):
    """``python -m peft_hcp.cli [COMMAND] --help``, as ``accelerate launch -m peft_hcp.cli`` starts it."""
    done = _python("-X", "importtime", "-m", "peft_hcp.cli", *command, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: {' '.join(['peft-hcp', *command])}")
    imported = _imported(done.stderr)
    assert {"peft_hcp", "argparse"} <= imported  # the report was read
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY) == []


def test_console_script_help_imports_neither_torch_nor_peft():
    """The console script's process (``sys.argv[0]`` is the script ``peft-hcp``) imports ``peft_hcp.cli`` as the
    script does, and answers ``train --help`` without torch, PEFT, diffusers or transformers."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.argv[0] = "/usr/local/bin/peft-hcp"
        from peft_hcp.cli import main
        try:
            main(["train", "--help"])
        except SystemExit as exit:
            print(json.dumps({{"code": exit.code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
        """
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "heavy": []}


def test_a_command_registers_the_types_it_loads(tmp_path):
    """In the command's own process, where ``import peft_hcp`` does not register, ``export`` loads a saved LoRA
    set (which needs ``HCP_LORA`` registered) and writes its kohya file."""
    from safetensors.torch import load_file

    from peft_hcp import HcpLoraConfig, save_adapter
    from peft_hcp.adapter_set import attach
    from peft_hcp.embedded import embedded_pipeline

    pipe = embedded_pipeline()
    hosts = [name for name, _ in pipe.unet.named_modules() if name.endswith("attn1.to_q")]
    attach(pipe.unet, HcpLoraConfig(target_modules=["re:.*attn1.to_q$"], init_weights=False), "style")
    save_adapter(pipe, str(tmp_path / "set"))
    out = tmp_path / "lora.safetensors"
    script = textwrap.dedent(
        f"""
        import sys
        sys.argv[0] = "/usr/local/bin/peft-hcp"
        from peft_hcp.cli import main
        sys.exit(main(["export", {str(tmp_path / "set")!r}, "--format", "kohya", "--out", {str(out)!r}]))
        """
    )
    done = _python("-c", script, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == str(out)
    names = {key.rsplit(".", 2)[0] for key in load_file(str(out))}
    assert len(names) == len(hosts) > 0 and all(
        name.startswith("lora_unet_") and name.endswith("attn1_to_q") for name in names
    )


def test_import_registers_every_bundled_type_without_the_controlnet_model_code():
    script = textwrap.dedent(
        """
        import json, sys
        import peft_hcp
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        registered = sorted(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING if t.value.startswith("HCP_"))
        loaded = lambda: sorted(m for m in sys.modules if "controlnet" in m and m != "peft_hcp.adapters.controlnet_types")
        before = loaded()
        from peft_hcp import HcpFluxControlNetConfig, HcpSD3ControlNetConfig
        config = HcpFluxControlNetConfig(num_layers=1, num_single_layers=1)
        after_config = loaded()
        plugin = config.plugin_cls  # the block class: its module loads now
        print(json.dumps({"registered": registered, "before": before, "after_config": after_config,
                          "plugin": f"{plugin.__module__}.{plugin.__name__}", "all": sorted(peft_hcp.__all__),
                          "submodule": peft_hcp.hub.push_adapter is peft_hcp.push_adapter}))
        """
    )
    done = _python("-c", script, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    types = ["CONTROLNET", "FLUX_CONTROLNET", "LOHA", "LOKR", "LORA", "PRELU", "SD3_CONTROLNET", "SKIP"]
    assert found["registered"] == [f"HCP_{t}" for t in types]
    assert found["before"] == found["after_config"] == []  # neither ours nor diffusers' ControlNets
    assert found["plugin"] == "peft_hcp.adapters.controlnet_dit.FluxControlNetPlugin"
    assert {"HcpLoraConfig", "ControlNetPlugin", "load_adapter", "wrap_model", "PeftHcpError"} <= set(found["all"])
    assert found["submodule"]  # a subpackage is an attribute, as when the package imported everything


@pytest.mark.parametrize(
    "error",
    [
        SelectorSyntaxError("x"),
        SelectorMatchError("x"),
        UnsupportedLayerError("x"),
        MergeNotSupportedError("x"),
        CheckpointError("x"),
        PluginConfigError("x"),
        SettingsError("x"),
        ImageFileError("x"),
        ValueError("x"),
        FileNotFoundError("x"),
        PermissionError("x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_peft_hcp_error_and_bad_input_is_an_input_error(error):
    assert is_input_error(error)


@pytest.mark.parametrize("error", [TypeError("x"), KeyError("x"), RuntimeError("x"), AttributeError("x")])
def test_other_errors_are_bugs(error):
    assert not is_input_error(error)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("peft-hcp: error: ")
    return lines[0]


def test_each_command_reports_bad_input_in_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\nplugin_unet: x\n")
    assert main(["train", str(bad)]) == 2  # a SettingsError, its YAML message spread over lines
    assert "bad.yaml: not valid YAML" in _error_line(capsys)
    assert main(["sample", "--adapter", str(tmp_path), "steps=2"]) == 2
    assert "at least one prompt" in _error_line(capsys)
    assert main(["sample", "--adapter", str(tmp_path / "none"), "prompt=a cat"]) == 2
    assert "is not a folder" in _error_line(capsys)
    assert main(["push", str(tmp_path), "user/repo"]) == 2  # no adapter set there
    assert str(tmp_path) in _error_line(capsys)
    assert main(["export", str(tmp_path), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert str(tmp_path) in _error_line(capsys)
    (tmp_path / "not.safetensors").write_bytes(b"not a safetensors file")
    assert main(["import", str(tmp_path / "not.safetensors"), "--out", str(tmp_path / "set")]) == 2
    assert "not.safetensors" in _error_line(capsys)
    assert not os.path.exists(tmp_path / "set")
