"""The quantized benchmark pairs run (a smoke test: one call per side, no timing asserted) and report what does not
depend on the machine: PEFT's own quantized layer as the reference, the exact saved-for-backward ratio, the bytes."""

from __future__ import annotations

import pytest

from benchmarks import run


pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")


def test_quantized_pairs_run_against_peft_layers_for_quantized_hosts():
    argv = ["--model", "tiny", "--resolution", "8", "--repeats", "1", "--warmup", "0"]
    results = {r["pair"]: r for r in run.main(argv + ["--only", "train_lora_nf4", "train_lora_int8", "train_loha_nf4"])}
    nf4, int8, loha = results["train_lora_nf4"], results["train_lora_int8"], results["train_loha_nf4"]
    assert "peft.tuners.lora.bnb.Linear4bit" in nf4["info"]["ref_layers"]
    assert "peft.tuners.lora.torchao.TorchaoLoraLinear" in int8["info"]["ref_layers"]
    for result in (nf4, int8):
        assert result["saved_ratio"] <= 1.0  # dropout's 1-bit mask saving carries over to quantized hosts
        assert "time_ratio" in result["anchors"]["HcpLora on the fp32 base"]
    # 4 bits and a scale per 64 weights (double-quantized) against 32 bits; int8 and a scale per row
    assert 0.12 < nf4["info"]["quantized_vs_fp32_bytes"] < 0.2
    assert 0.25 < int8["info"]["quantized_vs_fp32_bytes"] < 0.3
    if "skipped" not in loha:  # LyCORIS (the reference) installed
        assert loha["info"]["quantized_layers"] == nf4["info"]["quantized_layers"] > 0
        assert loha["info"]["lycoris_bypass_layers"] > 0
        assert all(n > 0 for n in loha["saved_bytes"].values())
