"""FSDP2 training of a LoRA: 2 processes sharding the UNet against 1 process, on the same global batch.

    python -m benchmarks.fsdp_train_lora [--model tiny|sd15] [--steps 5] [--batch 2] [--resolution 32] [--json PATH]

Each side runs in processes of its own (forked, CPU, gloo, one torch thread each): one process training
HcpLora (rank 8, attention + feed-forward + ResNet convolutions) on the whole batch, then two processes with the
UNet sharded per block (:func:`peft_hcp.fsdp.shard_model`) on half of it each. Per process it reports the bytes of
the frozen base it holds, its resident memory before training and at its peak during the steps, and the median
time of a step after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.measure import MemoryProbe, benchmark_process
from benchmarks.pairs import RANK
from benchmarks.workload import TRAIN_TARGETS, Workload
from peft_hcp import HcpLoraConfig
from peft_hcp.fsdp import held_bytes, shard_model


def _rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def run_rank(args: argparse.Namespace, rank: int, world: int, port: int, queue) -> None:
    """One process's share: build, (shard), train ``args.steps`` steps on its slice of the batch, report."""
    from peft import get_peft_model

    with benchmark_process(1):
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        workload = Workload(torch.device("cpu"), torch.float32, args.resolution, args.batch, args.model)
        sample, timestep, text = (t.chunk(world)[rank] for t in workload.inputs)
        torch.manual_seed(0)
        model = get_peft_model(workload.base, HcpLoraConfig(target_modules=["re:" + TRAIN_TARGETS], r=RANK))
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shard_model(model, init_device_mesh("cpu", (world,)))
        target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times: list[float] = []

        def step() -> None:
            began = time.perf_counter()
            F.mse_loss(model(sample, timestep, encoder_hidden_states=text).sample, target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)

        step()  # warm-up: allocates the optimizer state
        before = _rss()
        memory = MemoryProbe(torch.device("cpu")).measure(lambda: [step() for _ in range(args.steps)])
        held, whole = held_bytes(model, trainable=False)
        queue.put(
            {
                "rank": rank,
                "frozen_held": held,
                "frozen_whole": whole,
                "rss_before": before,
                "rss_peak": before + memory.peak,
                "step_s": statistics.median(times[1:]),
            }
        )
        if world > 1:
            torch.distributed.destroy_process_group()


def run_side(args: argparse.Namespace, world: int) -> list[dict]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = 29600 + os.getpid() % 300
    ranks = [context.Process(target=run_rank, args=(args, r, world, port, queue)) for r in range(world)]
    for process in ranks:
        process.start()
    reports = sorted((queue.get(timeout=args.timeout) for _ in ranks), key=lambda r: r["rank"])
    for process in ranks:
        process.join(args.timeout)
        if process.exitcode != 0:
            raise RuntimeError(f"a process of the {world}-process side exited with {process.exitcode}")
    return reports


def table(sides: dict[str, list[dict]]) -> str:
    mib = 2**20
    rows = [
        "| side | rank | frozen held / whole (MiB) | RSS before / peak during steps (MiB) | median step s |",
        "|---|---|---|---|---|",
    ]
    for name, reports in sides.items():
        for r in reports:
            rows.append(
                f"| {name} | {r['rank']} | {r['frozen_held'] / mib:.1f} / {r['frozen_whole'] / mib:.1f} "
                f"| {r['rss_before'] / mib:.0f} / {r['rss_peak'] / mib:.0f} | {r['step_s']:.3f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_train_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps after one warm-up step.")
    parser.add_argument("--batch", type=int, default=2, help="The global batch (halved per process under FSDP).")
    parser.add_argument("--resolution", type=int, default=32, help="Latent size.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds a side may take.")
    parser.add_argument("--json", metavar="PATH", help="Write the numbers here.")
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even: the two processes take half of it each.")
    sides = {"1 process": run_side(args, 1), "FSDP2, 2 processes": run_side(args, 2)}
    print(table(sides))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": {k: v for k, v in vars(args).items() if k != "json"}, "sides": sides}, handle, indent=2)
    return sides


if __name__ == "__main__":
    main()
