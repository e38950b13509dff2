"""Timing and memory measurement of two sides on one machine, interleaved so noise hits both.

Memory on CPU is the process's resident set: glibc is told to serve large blocks with ``mmap`` (so a
freed tensor leaves the RSS at once) and the kernel's peak counter (``VmHWM``) is reset before each
measured call. On CUDA it is the caching allocator's ``max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_os() -> None:
    """Make RSS track live CPU tensors: blocks of 128 KiB and more get their own mapping."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 17)
    except OSError:  # not glibc: RSS then over-counts freed blocks, on both sides alike
        pass


@dataclass
class Memory:
    """Bytes above the level before the call: ``peak`` during it, ``retained`` after it."""

    peak: int
    retained: int


class MemoryProbe:
    """Measures one call's peak and retained memory on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def measure(self, fn: Callable[[], object]) -> Memory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return Memory(torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before)
        before = _reset_rss_peak()
        fn()
        gc.collect()
        status = _proc_status()
        return Memory(status["VmHWM"] - before, status["VmRSS"] - before)


def _proc_status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def _reset_rss_peak() -> int:
    """Reset the kernel's peak-RSS counter to the current RSS (``clear_refs`` 5) and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status()["VmRSS"]


@dataclass
class Timings:
    """Seconds per call of each side, in the order they ran (A and B alternate)."""

    hcp: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median time of peft-hcp over median time of the reference."""
        return statistics.median(self.hcp) / statistics.median(self.ref)


def interleaved(
    hcp: Callable[[], Callable[[], object]],
    ref: Callable[[], Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> Timings:
    """Time the calls ``hcp()`` and ``ref()`` return, alternately, after ``warmup`` calls of each.

    Rounds alternate AB and BA. Getting the call (``hcp()``) is not timed: one-shot operations such as
    attaching an adapter prepare a fresh model there.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        hcp()()
        ref()()
    timings = Timings()
    for round_ in range(repeats):
        order = [(hcp, timings.hcp), (ref, timings.ref)]
        for make, out in order if round_ % 2 == 0 else reversed(order):
            call = make()
            sync()
            start = time.perf_counter()
            call()
            sync()
            out.append(time.perf_counter() - start)
            del call
    return timings
