"""``python -m benchmarks.sizes``: the LoRA-with-dropout pair across latent sizes, as a plot.

    python -m benchmarks.sizes [--model tiny] [--sizes 16 32 48 64] [--png benchmarks/lora_dropout_sizes.png]

For each latent size it measures ``train_lora_dropout`` as ``python -m benchmarks.run`` does (HcpLora,
PEFT LoRA and, when installed, HCP-Diffusion's LoRA, interleaved in one process) and plots the median
step time and the bytes saved for backward of each against the size. ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.anchors import INSTALL, Skip, need
from benchmarks.measure import benchmark_process
from benchmarks.run import run_pair
from benchmarks.workload import DTYPES, Workload


PAIR = "train_lora_dropout"
LABELS = {"hcp": "peft-hcp HcpLora", "ref": "PEFT LoRA"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sizes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="tiny")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64], help="Latent sizes.")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", default="benchmarks/lora_dropout_sizes.png", help="Where to write the plot.")
    parser.add_argument("--json", metavar="PATH", help="Write the measurements here too.")
    return parser.parse_args(argv)


def sweep(args: argparse.Namespace) -> list[dict]:
    """One ``train_lora_dropout`` result per size, in order."""
    results = []
    for size in args.sizes:
        torch.manual_seed(0)
        workload = Workload(torch.device("cpu"), DTYPES[args.dtype], size, 1, args.model)
        result = run_pair(PAIR, workload, args.repeats, args.warmup)
        ratios = f"time ratio {result['time_ratio']:.3f}, saved ratio {result['saved_ratio']:.3f}"
        print(f"[{args.model} {size}x{size}: {ratios}]", flush=True)
        results.append({"size": size, **result})
    return results


def plot(results: list[dict], args: argparse.Namespace) -> None:
    """Step time (absolute and over PEFT's) and bytes saved for backward of every side against the size."""
    pyplot = need("matplotlib.pyplot", INSTALL)
    sizes = [r["size"] for r in results]
    figure, (times, ratios, saved) = pyplot.subplots(1, 3, figsize=(10, 3.3), dpi=80)
    for side in results[0]["saved_bytes"]:
        label = LABELS.get(side, side)
        medians = [statistics.median(r["seconds"][side]) for r in results]
        times.plot(sizes, medians, marker="o", label=label)
        ratios.plot(sizes, [m / statistics.median(r["seconds"]["ref"]) for m, r in zip(medians, results)], marker="o")
        saved.plot(sizes, [r["saved_bytes"][side] / 2**20 for r in results], marker="o", label=label)
    times.set(xlabel="latent size", ylabel="median train step (s)", xticks=sizes, yscale="log")
    ratios.set(xlabel="latent size", ylabel="step time / PEFT's", xticks=sizes)
    saved.set(xlabel="latent size", ylabel="saved for backward (MiB)", xticks=sizes)
    saved.legend(fontsize=7)
    title = f"LoRA rank 8, dropout 0.1: {args.model} UNet, {args.dtype}, batch 1, {args.threads} CPU thread(s)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(args.png)
    print(f"wrote {args.png}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with benchmark_process(args.threads):
        results = sweep(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": vars(args), "results": results}, f, indent=2)
    try:
        plot(results, args)
    except Skip as exc:
        print(f"no plot: {exc}")
    return results


if __name__ == "__main__":
    main()
