"""``peft-hcp train CONFIG quantize=...``: a run on a quantized UNet (the embedded pipeline's), with gradient
checkpointing, whose adapter loads onto the float UNet; an unknown scheme is one line and exit code 2."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import torch
from peft import PeftModel

from peft_hcp.cli import main
from peft_hcp.embedded import tiny_unet, unet_inputs
from peft_hcp.quant import quantization_of
from peft_hcp.train import Trainer, load_settings
from tests.helpers import ROOT, run_python, unet_out


LORA = os.path.join(ROOT, "configs", "lora.yaml")
FAST = ["steps=3", "save_every=3", "batch_size=2", "data_size=8", "eval_size=2", "sample.steps=2", "sample.seeds=[0]"]


def test_an_unknown_scheme_is_one_line_naming_the_allowed_ones(tmp_path, capsys):
    assert main(["train", LORA, f"output_dir={tmp_path}", "quantize=int3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "quantize must be one of nf4, fp4, int8, int8-torchao," in err and "got 'int3'" in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8", "fp8", "int8-torchao", "gguf-q8_0"])
def test_each_scheme_quantizes_the_unet_before_the_plugins_attach(scheme, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    pytest.importorskip("gguf")
    trainer = Trainer(load_settings(LORA, [f"output_dir={tmp_path}", f"quantize={scheme}", *FAST]))
    unet = trainer.pipe.unet
    hosts = [m for m in unet.modules() if isinstance(m, torch.nn.Linear) and quantization_of(m) is not None]
    assert hosts
    trainable = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert trainable and not any(p is host.weight for host in hosts for p in trainable)


def test_an_nf4_run_with_gradient_checkpointing_trains_scores_and_loads_on_the_float_unet(tmp_path):
    pytest.importorskip("bitsandbytes")
    printed = io.StringIO()
    overrides = [f"output_dir={tmp_path}", "quantize=nf4", "gradient_checkpointing=true", *FAST]
    with contextlib.redirect_stdout(printed):
        assert main(["train", LORA, *overrides]) == 0
    assert re.search(r"concept score: before [\d.]+ after [\d.]+", printed.getvalue()), printed.getvalue()
    with open(os.path.join(tmp_path, "train.log"), encoding="utf-8") as handle:
        log = handle.read()
    losses = [float(x) for x in re.findall(r"step \d+/3 loss ([\d.]+)", log)]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    # the adapter trained on the nf4 UNet is a plain adapter folder: it loads onto the float UNet and changes it
    folder = os.path.join(tmp_path, "checkpoints", "step-000003", "unet")
    batch = unet_inputs()
    loaded = unet_out(PeftModel.from_pretrained(tiny_unet(), folder), batch)
    assert (loaded - unet_out(tiny_unet(), batch)).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_step(tmp_path):
    """The same micro-batch's loss and LoRA gradients with and without recomputation (on the float UNet)."""
    grads = []
    for checkpointing in ("false", "true"):
        overrides = [f"output_dir={tmp_path / checkpointing}", f"gradient_checkpointing={checkpointing}", *FAST]
        trainer = Trainer(load_settings(LORA, overrides))
        assert trainer.pipe.unet.is_gradient_checkpointing == (checkpointing == "true")
        trainer.loss(trainer.batches.draw(1, 0)).backward()
        grads.append([p.grad.clone() for group in trainer.optimizer.param_groups for p in group["params"]])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_a_scheme_whose_quantizer_is_missing_names_the_package_and_the_extra(tmp_path):
    """Without the ``quant`` extra: one line naming the package, exit code 2 (bitsandbytes hidden from a fresh process)."""
    result = run_python(
        "sys.modules['bitsandbytes'] = None\nfrom peft_hcp.cli import main\nsys.exit(main(sys.argv[1:]))",
        "train",
        LORA,
        f"output_dir={tmp_path}",
        "quantize=nf4",
        *FAST,
        check=False,
        timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("peft-hcp: error: ") and "'bitsandbytes'" in last and "peft-hcp[quant]" in last, last
