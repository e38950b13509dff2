"""``python -m benchmarks.run``: peft-hcp against PEFT and the bare model, in one process, as ratios.

Each pair runs both sides (and its anchors, when installed) on the same inputs, alternating them
(AB BA ...) after a warm-up so that the noise of a shared machine hits all alike; the table shows
peft-hcp / reference for the median time, for the peak memory of one call and, for training pairs,
for the bytes saved for backward (exact). ``--json`` writes every raw time and byte count.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import torch

import peft_hcp
from benchmarks.measure import (
    Memory,
    MemoryProbe,
    Timings,
    benchmark_process,
    interleaved,
)
from benchmarks.pairs import PAIRS, Skip
from benchmarks.workload import DTYPES, TrainStep, Workload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, default=None, help="Latent size (default 32 on CPU, 64 on CUDA).")
    parser.add_argument("--batch", type=int, default=None, help="Batch size (default 1 on CPU, 4 on CUDA).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls of each side (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed calls of each side first.")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="SD1.5-shaped UNet, or the tiny one.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default 1 on CPU: steadier on a shared machine).",
    )
    parser.add_argument("--only", nargs="+", metavar="PAIR", help=f"Run only these pairs, of: {', '.join(PAIRS)}.")
    parser.add_argument("--json", metavar="PATH", help="Write the raw numbers here.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; known: {', '.join(PAIRS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine.")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0.")
    cuda = args.device == "cuda"
    args.resolution = args.resolution or (64 if cuda else 32)
    args.batch = args.batch or (4 if cuda else 1)
    args.threads = args.threads or (torch.get_num_threads() if cuda else 1)
    return args


def run_pair(name: str, workload: Workload, repeats: int, warmup: int) -> dict:
    """Measure one pair: interleaved timings of every side, then one call of each for memory."""
    try:
        pair = PAIRS[name](workload)
    except Skip as exc:
        return {"pair": name, "skipped": str(exc)}
    sides = pair.sides()
    timings = interleaved({side: pair.maker(side) for side in sides}, repeats, warmup, workload.device)
    probe = MemoryProbe(workload.device)
    memory = {side: probe.measure(pair.maker(side)()) for side in sides}
    # exact bytes saved for backward, for the sides that train
    saved = {side: call.saved_bytes() for side, call in sides.items() if isinstance(call, TrainStep)}
    anchors = {anchor: {"reference": anchor, **_ratios(timings, memory, saved, anchor)} for anchor in pair.anchors}
    anchors.update({anchor: {"reference": anchor, "skipped": why} for anchor, why in pair.skipped_anchors.items()})
    return {
        "pair": name,
        "reference": pair.reference,
        **_ratios(timings, memory, saved, "ref"),
        "seconds": timings.seconds,
        "peak_bytes": {side: m.peak for side, m in memory.items()},
        "retained_bytes": {side: m.retained for side, m in memory.items()},
        **({"saved_bytes": saved} if saved else {}),
        "anchors": anchors,
        "info": pair.info,
    }


def _ratios(timings: Timings, memory: dict[str, Memory], saved: dict[str, int], reference: str) -> dict:
    """peft-hcp over ``reference``: median time, peak memory and (training sides) bytes saved for backward."""
    ratios = {
        "time_ratio": timings.ratio("hcp", reference),
        "peak_ratio": _ratio(memory["hcp"].peak, memory[reference].peak),
    }
    if reference in saved:
        ratios["saved_ratio"] = _ratio(saved["hcp"], saved[reference])
    return ratios


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def table(results: list[dict]) -> str:
    """The results as a Markdown table (ratios < 1 mean peft-hcp is faster / smaller); anchors below their pair."""
    rows = [
        "| pair | reference | time ratio | peak-memory ratio | saved-for-backward ratio | median s (hcp / ref) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['pair']} | skipped: {r['skipped']} | | | | |")
            continue
        rows.append(_row(r["pair"], r, r["seconds"]["hcp"], r["seconds"]["ref"]))
        for anchor, a in r["anchors"].items():
            if "skipped" in a:
                rows.append(f"| {r['pair']} (anchor) | {anchor}: skipped, {a['skipped']} | | | | |")
            else:
                rows.append(_row(f"{r['pair']} (anchor)", a, r["seconds"]["hcp"], r["seconds"][anchor]))
    return "\n".join(rows)


def _row(pair: str, r: dict, hcp_seconds: list[float], ref_seconds: list[float]) -> str:
    def fmt(ratio: float | None) -> str:
        return "n/a" if ratio is None else f"{ratio:.3f}"

    saved = fmt(r["saved_ratio"]) if "saved_ratio" in r else ""
    med = statistics.median(hcp_seconds), statistics.median(ref_seconds)
    return (
        f"| {pair} | {r['reference']} | {r['time_ratio']:.3f} | {fmt(r['peak_ratio'])} | {saved} "
        f"| {med[0]:.4f} / {med[1]:.4f} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with benchmark_process(args.threads):
        results = run_all(args)
    print(table(results))
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        env = {"torch": torch.__version__, "peft_hcp": peft_hcp.__version__, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "environment": env, "results": results}, f, indent=2)
    return results


def run_all(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    workload = Workload(torch.device(args.device), DTYPES[args.dtype], args.resolution, args.batch, args.model)
    results = []
    for name in args.only or PAIRS:
        start = time.perf_counter()
        results.append(run_pair(name, workload, args.repeats, args.warmup))
        gc.collect()
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    return results


if __name__ == "__main__":
    main()
