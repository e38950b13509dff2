"""The benchmark harness on the tiny UNet: its pairs compute the same thing on both sides, and its CLI."""

import json

import pytest
import torch
from peft_hcp.adapters.lora import LoraBlock
from torch import nn

from benchmarks import run
from benchmarks.measure import MemoryProbe, interleaved, return_freed_memory_to_os
from peft_hcp import HcpLoraConfig
from peft_hcp.embedded import tiny_unet
from peft_hcp.single.model import find_hosts


def test_pairs_match_their_references_and_write_json(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--resolution", "8", "--repeats", "2", "--warmup", "0", "--json", str(path)]
    run.main(argv + ["--only", "infer_unmerged", "infer_merged", "attach"])
    data = json.loads(path.read_text())
    results = {r["pair"]: r for r in data["results"]}
    assert set(results) == {"infer_unmerged", "infer_merged", "attach"}
    for result in results.values():
        assert len(result["seconds"]["hcp"]) == len(result["seconds"]["ref"]) == 2
        assert all(t > 0 for t in result["seconds"]["hcp"] + result["seconds"]["ref"])
        assert result["time_ratio"] > 0
    assert results["infer_unmerged"]["info"]["max_abs_diff"] < 1e-5  # same weights: same output as PEFT LoRA
    assert results["infer_merged"]["info"]["merged_vs_unmerged_max_abs_diff"] < 1e-4
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in tiny_unet().modules())
    assert results["attach"]["info"]["layers"] == n_layers
    assert data["setup"]["threads"] == 1


def test_interleaving_alternates_sides():
    calls = []
    timings = interleaved(lambda: lambda: calls.append("a"), lambda: lambda: calls.append("b"), 3, 1, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(timings.hcp) == len(timings.ref) == 3


def test_cpu_memory_probe_sees_a_freed_tensor():
    return_freed_memory_to_os()
    memory = MemoryProbe(torch.device("cpu")).measure(lambda: torch.ones(16 * 2**20 // 4).sum())
    assert memory.peak >= 15 * 2**20
    assert memory.retained < 4 * 2**20


def test_cli_rejects_unknown_pairs_and_missing_cuda():
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run.parse_args(["--device", "cuda"])
    args = run.parse_args(["--device", "cpu"])
    assert (args.resolution, args.batch, args.threads) == (32, 1, 1)


def test_find_hosts_with_one_selector_per_layer_is_the_whole_model():
    unet = tiny_unet()
    every = find_hosts(unet, HcpLoraConfig(target_modules=[""]), LoraBlock)
    assert find_hosts(unet, HcpLoraConfig(target_modules=every[::-1]), LoraBlock) == every  # model order
    assert len(every) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
