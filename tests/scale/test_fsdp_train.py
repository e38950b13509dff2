"""``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`` on CPU really shards the trainer's models,
trains to the adapter of a 2-process DDP run of the same global batch, samples and checkpoints collectively,
resumes, and writes checkpoints that load in one process; an FSDP request that cannot happen is an error.

The launches run ``fsdp_train_worker.py`` (the trainer of ``peft-hcp train``) in subprocesses with a timeout.
Tolerance: the two processes average two half-batch gradients under DDP and FSDP alike; measured, the adapters and
optimizer states are bit-identical, and the check allows 1e-6 (rounding of another reduction order).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_hcp
from peft_hcp.cli import main
from peft_hcp.train.checkpoint import checkpoint_dir
from tests.helpers import ROOT, tiny_pipeline


CONFIG = r"""
plugin_unet:
  lora1:
    _target_: LoraBlock
    _partial_: True
    lr: 1e-4
    layers: ['re:.*\.attn.?$']
  cn:
    _target_: ControlNetPlugin
    _partial_: True
    lr: 1e-4
    conditioning_embedding_out_channels: [8, 16]
"""
LAUNCH = {
    "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--main_process_port", "29527"],
    "ddp": ["--multi_gpu", "--main_process_port", "29528"],
}


def launch(mode: str, folder: Path) -> tuple[Path, list[dict]]:
    """Run the worker under ``accelerate launch`` with 2 processes; the output folder and each rank's report."""
    config = folder / "config.yaml"
    config.write_text(CONFIG)
    out = folder / mode
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH[mode], "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [os.path.join(ROOT, "tests", "scale", "fsdp_train_worker.py"), str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return launch("fsdp", tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launch("ddp", tmp_path_factory.mktemp("ddp"))


def adapter_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (its adapter files and optimizer state), keyed by file and name."""
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)):
        tensors.update({f"{os.path.relpath(path, folder)}:{k}": v for k, v in load_file(path).items()})
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_the_cli_shards_the_base_per_block_and_samples_on_every_rank(fsdp_run):
    out, reports = fsdp_run
    for report in reports:
        assert (report["processes"], report["unet"], report["end_step"]) == (2, "FSDPUNet2DConditionModel", 2)
        # torch keeps the root's own parameters (conv_in, time embedding, conv_out) gathered after the run's last
        # no-grad forward; between training steps a rank holds exactly half (the log says so)
        assert 0.45 < report["frozen_held"] / report["frozen_whole"] < 0.56
    assert reports[0]["samples"][0].endswith("step-000002.png") and reports[1]["samples"] == [None]
    log = (out / "train.log").read_text()
    assert f"FSDP2: this rank holds {reports[0]['frozen_whole'] // 2} of the UNet's" in log


def test_fsdp_trains_the_adapter_of_a_ddp_run(fsdp_run, ddp_run):
    (fsdp_out, _), (ddp_out, ddp_reports) = fsdp_run, ddp_run
    assert ddp_reports[0]["unet"] == "DistributedDataParallel"
    fsdp, ddp = (adapter_tensors(checkpoint_dir(str(out), 2)) for out in (fsdp_out, ddp_out))
    assert any("cn" in key for key in fsdp) and any("optimizer" in key for key in fsdp)
    assert_same(fsdp, ddp, atol=1e-6)
    first = adapter_tensors(checkpoint_dir(str(fsdp_out), 1))
    assert max((fsdp[k] - first[k]).abs().max().item() for k in fsdp if "adapter" in k) > 1e-5  # step 2 trained


def test_a_resumed_fsdp_run_continues_as_the_uninterrupted_one(fsdp_run):
    out, reports = fsdp_run
    assert [report["resumed_from"] for report in reports] == [1, 1]
    assert_same(adapter_tensors(checkpoint_dir(str(out), 2)), adapter_tensors(str(out / "uninterrupted")), atol=0)


def test_an_fsdp_checkpoint_loads_in_one_process(fsdp_run):
    out, _ = fsdp_run
    folder = checkpoint_dir(str(out), 2)
    pipe = tiny_pipeline()
    entries = peft_hcp.load_adapter(pipe, folder)  # strict: a missing, extra or mis-shaped weight is refused
    assert {(e.component, e.name) for e in entries} == {("unet", "lora1"), ("unet", "cn")}
    saved = adapter_tensors(folder)
    state = pipe.unet.state_dict()
    key = next(k for k in state if k.endswith("lora_up.weight") and ".lora1." in k)
    assert torch.equal(
        state[key], saved[f"unet/lora1/adapter_model.safetensors:base_model.model.{key.replace('.lora1.', '.')}"]
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FSDP_VERSION": "2"}, "1 process"),
        ({"FSDP_VERSION": "1"}, "runs FSDP2"),
        ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "FSDP_ACTIVATION_CHECKPOINTING"),
    ],
)
def test_an_fsdp_request_that_cannot_happen_is_an_error(env, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    assert main(["train", str(config), f"output_dir={tmp_path / 'out'}", "steps=1"]) == 2
    assert message in capsys.readouterr().err
