"""Latency the way BENCHMARKS.md asks: pinned threads, warm-up, interleaved peers, median with p10/p90,
and a verdict on whether the figure can be trusted (spread, machine load)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# A measurement is flagged unreliable when its p10-p90 spread exceeds this fraction of the median, or when
# the machine's 1-minute load average exceeds this many times its CPU count (other work competes for cores).
MAX_SPREAD = 0.25
MAX_LOAD_PER_CPU = 1.25


@dataclass(frozen=True)
class LatencyStats:
    """Repeated timings of one callable in ms: ``median`` with ``p10``/``p90``; ``reliable`` is False (and
    ``note`` says why) when the spread is wide or the machine was busy while measuring."""

    median: float
    p10: float
    p90: float
    samples: int
    reliable: bool
    note: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile (0..1) of ``values`` (numpy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def machine_load() -> tuple[float, int]:
    """(1-minute load average, CPU count); load is 0.0 where the OS does not report it."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return load, os.cpu_count() or 1


def busy_note(load: float | None = None, cpus: int | None = None) -> str | None:
    """Why timings cannot be trusted on this machine now (None when it is quiet enough)."""
    if load is None or cpus is None:
        load, cpus = machine_load()
    if load > MAX_LOAD_PER_CPU * cpus:
        return f"machine busy (load average {load:.1f} on {cpus} CPUs)"
    return None


def summarize(times_ms: list[float], busy: str | None = None, unit: str = "ms") -> LatencyStats:
    """Median, p10, p90 of ``times_ms`` and the reliability verdict (spread over ``MAX_SPREAD`` or ``busy``)."""
    median, p10, p90 = statistics.median(times_ms), percentile(times_ms, 0.1), percentile(times_ms, 0.9)
    notes = []
    if median > 0 and (p90 - p10) / median > MAX_SPREAD:
        notes.append(f"wide spread (p10-p90 {p10:.3g}-{p90:.3g} {unit} around a {median:.3g} {unit} median)")
    if busy:
        notes.append(busy)
    return LatencyStats(median, p10, p90, len(times_ms), not notes, "; ".join(notes) or None)


def ratio_stats(baseline_ms: list[float], candidate_ms: list[float], busy: str | None = None) -> LatencyStats:
    """Speedup per interleaved round (baseline / candidate, same round), summarized like a latency."""
    return summarize([b / c for b, c in zip(baseline_ms, candidate_ms, strict=True) if c > 0], busy, unit="x")


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeat: int = 7, threads: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return measure_latency_interleaved({"fn": fn}, warmup, repeat, threads)["fn"]


def measure_latency_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 3, repeat: int = 7,
                                threads: int = 2) -> dict[str, float]:
    """Median ms per callable, timing them in turn (A B C, B C A, C A B, ...) so machine noise hits all alike.

    The order rotates every round: no callable always runs right after the same neighbour (whose
    cache footprint would otherwise tax it in every sample). :func:`measure_latency_spread` gives the
    spread and the reliability verdict as well.
    """
    return {name: stats.median for name, stats in measure_latency_spread(fns, warmup, repeat, threads).items()}


def measure_latency_spread(fns: dict[str, Callable[[], object]], warmup: int = 3, repeat: int = 15,
                           threads: int = 2, min_seconds: float = 0.0) -> dict[str, LatencyStats]:
    """:class:`LatencyStats` per callable from interleaved, order-rotating rounds (see
    :func:`measure_latency_interleaved`); at least ``repeat`` rounds, more until ``min_seconds`` have passed
    (at most ``4 * repeat``). The raw per-round times are in ``last_times()`` for ratio statistics.
    """
    times = _interleaved_times(fns, warmup, repeat, threads, min_seconds)
    busy = busy_note()
    _LAST.clear()
    _LAST.update(times)
    stats = {name: summarize(t, busy) for name, t in times.items()}
    _MEASURED.extend(stats.values())
    return stats


def last_times() -> dict[str, list[float]]:
    """The per-round times (ms) of the latest :func:`measure_latency_spread` call, by name."""
    return {name: list(t) for name, t in _LAST.items()}


def measured_since(mark: int) -> list[LatencyStats]:
    """Every measurement taken since ``mark = measurement_count()`` (the benchmark runner's reliability check)."""
    return list(_MEASURED[mark:])


def measurement_count() -> int:
    return len(_MEASURED)


_LAST: dict[str, list[float]] = {}
_MEASURED: list[LatencyStats] = []


def _interleaved_times(fns: dict[str, Callable[[], object]], warmup: int, repeat: int, threads: int,
                       min_seconds: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    with pinned_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        start_all = time.perf_counter()
        round_ = 0
        while round_ < repeat or (time.perf_counter() - start_all < min_seconds and round_ < 4 * repeat):
            shift = round_ % len(items)
            for name, fn in items[shift:] + items[:shift]:
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
            round_ += 1
    return times
