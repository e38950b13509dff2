"""Timing and memory measurement of the sides of a pair on one machine, interleaved so noise hits all.

Memory on CPU is the process's resident set: glibc is told to serve large blocks with ``mmap`` (so a
freed tensor leaves the RSS at once) and the kernel's peak counter (``VmHWM``) is reset before each
measured call. On CUDA it is the caching allocator's ``max_memory_allocated``. The bytes saved for
backward (:func:`saved_for_backward`) are counted exactly, from the tensors autograd packs.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


_M_MMAP_THRESHOLD = -3


@contextmanager
def benchmark_process(threads: int) -> Iterator[None]:
    """Freed memory returned to the OS first (so RSS peaks compare), ``threads`` torch threads inside."""
    return_freed_memory_to_os()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    """Seconds per call of each side, in the order they ran (the sides' order alternates)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, side: str, reference: str) -> float:
        """Median time of ``side`` over median time of ``reference``."""
        return statistics.median(self.seconds[side]) / statistics.median(self.seconds[reference])


def interleaved(
    sides: dict[str, Callable[[], Callable[[], object]]], repeats: int, warmup: int, device: torch.device
) -> Timings:
    """Time the calls each ``sides[name]()`` returns, in turn, after ``warmup`` calls of each.

    Rounds run the sides in order, then in reverse (AB BA ..., ABC CBA ...), so a drift of the
    machine's speed hits all of them alike. Getting the call is not timed: one-shot operations such
    as attaching an adapter prepare a fresh model there.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for make in sides.values():
            make()()
    timings = Timings({name: [] for name in sides})
    order = list(sides)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else reversed(order):
            call = sides[name]()
            sync()
            start = time.perf_counter()
            call()
            sync()
            timings.seconds[name].append(time.perf_counter() - start)
            del call
    return timings


def saved_for_backward(forward: Callable[[], object], weights: Iterable[torch.Tensor]) -> int:
    """Bytes that autograd keeps for backward while ``forward()`` runs, not counting ``weights``.

    Each storage counts once, however many saved tensors view it (q, k and v reading one input):
    that is the memory the graph holds until backward. Sizes, not values, so the figure is exact
    and the same on every run. Weights (parameters, buffers) are left out: they stay resident
    whether or not anything is trained.
    """
    skip = {part.untyped_storage().data_ptr() for weight in weights for part in plain_parts(weight)}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for part in plain_parts(tensor):
            storage = part.untyped_storage()
            if storage.data_ptr() not in skip:
                sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()  # held until summed: the graph keeps every saved storage alive, none is reused
    total = sum(sizes.values())
    del output
    return total


def plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s data: itself, or the inner tensors of a tensor subclass (torchao's
    quantized weights), which own no storage of their own."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in plain_parts(getattr(tensor, name))]
