"""Picking the fastest of equivalent kernels on the running machine (used where no fixed rule holds)."""

from __future__ import annotations

import time
from collections.abc import Callable


def race(fns: dict[str, Callable[[], object]], rounds: int = 3, budget_s: float = 0.5) -> str:
    """The name of the fastest callable: one warm-up each, then interleaved rounds (A B A B), best time
    of each, stopping early once ``budget_s`` is spent."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warm-up (packing, thread pools)
    stop = time.perf_counter() + budget_s
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
        if time.perf_counter() > stop:
            break
    return min(best, key=best.__getitem__)
