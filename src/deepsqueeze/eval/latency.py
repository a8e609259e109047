"""Latency the way BENCHMARKS.md asks: pinned threads, warm-up, median of repeated calls, interleaved peers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeat: int = 7, threads: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return measure_latency_interleaved({"fn": fn}, warmup, repeat, threads)["fn"]


def measure_latency_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 3, repeat: int = 7,
                                threads: int = 2) -> dict[str, float]:
    """Median ms per callable, timing them in turn (A B C, B C A, C A B, ...) so machine noise hits all alike.

    The order rotates every round: no callable always runs right after the same neighbour (whose
    cache footprint would otherwise tax it in every sample).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    with pinned_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for round_ in range(repeat):
            shift = round_ % len(items)
            for name, fn in items[shift:] + items[:shift]:
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
