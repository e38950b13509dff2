"""The benchmark harness on the tiny UNet: its pairs compute the same thing on both sides, and its CLI."""

import importlib.util
import json

import pytest
import torch
from torch import nn

from benchmarks import run, sizes
from benchmarks.anchors import Skip, need
from benchmarks.measure import (
    MemoryProbe,
    interleaved,
    return_freed_memory_to_os,
    saved_for_backward,
)
from peft_hcp import HcpLoraConfig
from peft_hcp.adapters.lora import LoraBlock
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
    sides = {name: (lambda name=name: lambda: calls.append(name)) for name in "abc"}
    timings = interleaved(sides, 3, 1, torch.device("cpu"))
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc"
    assert [len(timings.seconds[name]) for name in "abc"] == [3, 3, 3]
    assert timings.ratio("a", "b") > 0


def test_lora_dropout_saves_at_most_three_quarters_of_peft_for_backward(tmp_path):
    """The saved bytes are counted exactly (sizes of the tensors autograd keeps): a deterministic figure."""
    path = tmp_path / "bench.json"
    argv = ["--model", "tiny", "--only", "train_lora_dropout", "--repeats", "1", "--warmup", "0"]
    run.main(argv + ["--json", str(path)])
    (result,) = json.loads(path.read_text())["results"]
    assert result["saved_ratio"] <= 0.75
    assert result["saved_ratio"] == result["saved_bytes"]["hcp"] / result["saved_bytes"]["ref"]
    assert result["info"]["layers"] > 0 and result["info"]["dropout"] == 0.1
    for anchor in result["anchors"].values():  # measured when installed, else skipped with a one-line reason
        assert "time_ratio" in anchor and "saved_ratio" in anchor or "\n" not in anchor["skipped"]


def test_every_training_pair_reports_saved_bytes():
    argv = ["--model", "tiny", "--resolution", "8", "--repeats", "1", "--warmup", "0"]
    for result in run.main(argv + ["--only", "train_lora", "train_loha"]):
        measured_anchors = [name for name, anchor in result["anchors"].items() if "skipped" not in anchor]
        assert set(result["saved_bytes"]) == {"hcp", "ref", *measured_anchors}
        assert all(n > 0 for n in result["saved_bytes"].values())


def test_saved_for_backward_counts_each_storage_once_and_leaves_weights_out():
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    # x @ weight saves x and weight; x * 2 saves nothing; (x @ weight) ** 2 saves its input; x.sin() saves x again
    counted = saved_for_backward(lambda: ((x @ weight) ** 2 + x.sin()).sum(), [weight])
    assert counted == x.untyped_storage().nbytes() + 3 * 4 * 4


def test_a_missing_anchor_is_skipped_with_one_line():
    with pytest.raises(Skip) as info:
        need("no_such_anchor_package")
    assert "no_such_anchor_package" in str(info.value) and "\n" not in str(info.value)


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


def test_size_sweep_writes_its_numbers_and_the_plot_when_matplotlib_is_there(tmp_path):
    png, path = tmp_path / "sizes.png", tmp_path / "sizes.json"
    results = sizes.main(["--sizes", "8", "--repeats", "1", "--warmup", "0", "--png", str(png), "--json", str(path)])
    assert [r["size"] for r in results] == [8] and results[0]["saved_ratio"] <= 0.75
    assert json.loads(path.read_text())["results"][0]["saved_bytes"]["hcp"] > 0
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
