"""Picking the fastest of equivalent kernels on the running machine (used where no fixed rule holds).

A choice is made once per machine, not once per moment: :func:`choose` races the candidates with
enough interleaved repetitions that a busy neighbour cannot hide a kernel's true cost (the best time of
each is kept, since load only ever adds time), keeps the preferred (first) candidate unless another beats
it by a margin, and stores the decision per CPU model, CPU flags, thread count and torch version in
``$DEEPSQUEEZE_CACHE/kernels.json`` (default ``~/.cache/deepsqueeze``), so a later process reuses it
instead of racing again under whatever load it meets. This answers a measured failure: a first-call race
timed under load picked a kernel 20x slower than the other on that CPU (3,884 ms against 76 ms).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from deepsqueeze.core.files import write_text_atomic
from deepsqueeze.errors import ArtifactError, ModelError

__all__ = ["choose", "cpu_fingerprint", "forced_choice", "kernel_cache_path", "race"]

#: CPU flags that change which integer kernels are fast (recorded in the fingerprint and benchmark headers).
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                  "amx_bf16", "asimd", "sve", "i8mm")
_decisions: dict[str, str] = {}  # this process's decisions (also those read from the cache file)


def forced_choice(env_var: str, choices: Sequence[str]) -> str | None:
    """The kernel the environment variable ``env_var`` forces (None when unset); a value outside ``choices`` is an error."""
    forced = os.environ.get(env_var) or None
    if forced is not None and forced not in choices:
        raise ModelError(f"{env_var}={forced!r} is not one of {tuple(choices)}: fix or unset it")
    return forced


WARMUP_DROP_FACTOR = 4.0


def race(fns: dict[str, Callable[[], object]], rounds: int = 7, budget_s: float = 1.0, min_sample_s: float = 2e-3,
         drop_factor: float = 8.0) -> dict[str, float]:
    """Best time per call (seconds) of each callable: one warm-up each, then interleaved rounds (A B A B).

    Each sample repeats a callable until it has run ``min_sample_s`` (so a sub-millisecond kernel is
    not timed at the scheduler's granularity); a candidate whose best is ``drop_factor`` times the
    leader's after a round leaves the race (after the warm-up already, at ``WARMUP_DROP_FACTOR`` times that
    factor); after 2 rounds the race stops once ``budget_s`` is spent. A candidate dropped after its warm-up
    keeps its warm-up time as its best.
    """
    best = {name: float("inf") for name in fns}
    reps, warm = {}, {}
    for name, fn in fns.items():  # warm-up (packing, thread pools); also sizes each sample
        start = time.perf_counter()
        fn()
        warm[name] = elapsed = max(time.perf_counter() - start, 1e-7)
        reps[name] = max(1, min(1000, int(min_sample_s / elapsed)))
    # a warm-up far slower than the fastest one (packing included) is not timed again: a kernel that is
    # hopeless on this shape costs one call, not rounds of them
    live = {n: f for n, f in fns.items() if warm[n] <= WARMUP_DROP_FACTOR * drop_factor * min(warm.values())}
    best.update({n: warm[n] for n in fns if n not in live})
    stop = time.perf_counter() + budget_s
    for i in range(rounds):
        for name, fn in live.items():
            n = reps[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / n)
        lead = min(best[n] for n in live)
        live = {n: f for n, f in live.items() if best[n] <= drop_factor * lead}
        if len(live) == 1 or (i >= 1 and time.perf_counter() > stop):
            break
    return best


def cpu_fingerprint() -> str:
    """CPU model, the relevant flags it has, torch's thread count and version: what a kernel decision depends on."""
    import torch

    model, flags = _cpu_model_and_flags()
    present = sorted(f for f in RELEVANT_FLAGS if f in flags)
    return f"{model} | {' '.join(present) or '-'} | threads={torch.get_num_threads()} | torch {torch.__version__}"


@cache
def _cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def kernel_cache_path() -> Path:
    """Where kernel decisions persist: ``$DEEPSQUEEZE_CACHE/kernels.json`` (default ``~/.cache/deepsqueeze``)."""
    return Path(os.environ.get("DEEPSQUEEZE_CACHE") or Path.home() / ".cache" / "deepsqueeze") / "kernels.json"


def _read_cache(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: decisions are re-measured, never trusted blindly
    return data if isinstance(data, dict) else {}


def _persist(fingerprint: str, key: str, choice: str) -> None:
    path = kernel_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        entry = data.get(fingerprint)
        data[fingerprint] = entry = entry if isinstance(entry, dict) else {}
        entry[key] = choice
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except (OSError, ArtifactError):
        pass  # a read-only cache only costs a re-measurement in the next process


def choose(key: str, candidates: dict[str, Callable[[], object]], margin: float = 1.15,
           persist: bool = True) -> str:
    """The kernel to use for the case ``key`` (a string naming the operation, shapes and batch kind).

    ``candidates`` maps kernel names to callables that run the same product; the first one is the
    preferred kernel, kept unless another's best time beats it by ``margin`` (1.15: 15% faster). A
    decision already made in this process or stored for this machine (:func:`cpu_fingerprint`) in
    :func:`kernel_cache_path` among the same candidates is reused; otherwise the candidates race
    (:func:`race`) and the decision is stored. With one candidate nothing is measured.
    """
    names = list(candidates)
    if not names:
        raise ModelError(f"no kernel can run {key}")
    if len(names) == 1:
        return names[0]
    fingerprint = cpu_fingerprint()
    key = f"{key} among {','.join(names)}"  # a new candidate (a kernel added since) races again
    full = f"{fingerprint} :: {key}"
    known = _decisions.get(full)
    if known is None and persist:
        stored = _read_cache(kernel_cache_path()).get(fingerprint)
        known = stored.get(key) if isinstance(stored, dict) else None
    if known in candidates:
        _decisions[full] = known
        return known
    times = race(candidates)
    preferred = names[0]
    fastest = min(times, key=times.__getitem__)
    choice = fastest if times[fastest] * margin < times[preferred] else preferred
    _decisions[full] = choice
    if persist:
        _persist(fingerprint, key, choice)
    return choice


def forget_decisions() -> None:
    """Drop this process's in-memory decisions (tests; the cache file is left alone)."""
    _decisions.clear()
