"""Picking the fastest of equivalent kernels on the running machine (used where no fixed rule holds)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from deepsqueeze.errors import ModelError


def forced_choice(env_var: str, choices: Sequence[str]) -> str | None:
    """The kernel the environment variable ``env_var`` forces (None when unset); a value outside ``choices`` is an error."""
    forced = os.environ.get(env_var) or None
    if forced is not None and forced not in choices:
        raise ModelError(f"{env_var}={forced!r} is not one of {tuple(choices)}: fix or unset it")
    return forced


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
