"""Entropy coders on real Deep Compression streams and synthetic Laplacian streams: achieved size vs the
Shannon bound, and encode/decode throughput; zstd (level 19) and zlib (level 9) on the same bytes."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.runner import BenchContext

NAME = "entropy-coder"
TITLE = "Entropy coders: ANS and canonical Huffman vs the Shannon bound, zstd-19 and zlib-9"
SETUP = (
    "Streams: the weight-index and position-gap streams of zoo:lenet300 and zoo:lenet5 @fashion-mnist after "
    "one-shot magnitude pruning (94/90/70% and 35/88/95/80%) and 5-bit k-means sharing (no fine-tuning), "
    "gap symbols with 4-bit fillers as in the paper; and synthetic Laplacian streams (1M symbols, rounded, "
    "clipped to 32 or 256 symbols). `shannon` = order-0 bound (count x empirical entropy) in bytes; coded sizes "
    "include each coder's own tables (ANS: symbol counts; Huffman: code lengths). zstd (python-zstandard, level "
    "19) and zlib (level 9) compress the same stream stored one byte per symbol. Throughput in MB/s of "
    "symbol bytes (1 byte per symbol), median of 3 runs, 2 threads. Target: ANS within 1% of the bound on "
    "streams of at least 10,000 symbols."
)
MIN_SYMBOLS_FOR_TARGET = 10_000


def _median_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _real_streams(quick: bool) -> dict[str, tuple[np.ndarray, int]]:
    import copy

    from deepsqueeze.codec.codebook import split_codebook
    from deepsqueeze.codec.sparse_index import gap_symbols
    from deepsqueeze.prune import PruneConfig, prune_
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.share import ShareConfig, share_

    specs = {"lenet300": {"1": 0.94, "3": 0.9, "5": 0.7}}
    if not quick:
        specs["lenet5"] = {"0": 0.35, "2": 0.88, "5": 0.95, "7": 0.8}
    out: dict[str, tuple[np.ndarray, int]] = {}
    for name, overrides in specs.items():
        model = copy.deepcopy(resolve_model(f"zoo:{name}@fashion-mnist", progress=False))
        prune_(model, PruneConfig(sparsity=0.9, overrides=overrides))
        share_(model, ShareConfig(bits=5))
        for key, tensor in model.module.state_dict().items():
            if not key.endswith("weight") or tensor.numel() < 5000:
                continue
            codebook, mask, indices = split_codebook(tensor, sparse=True)
            out[f"{name} {key} indices"] = (indices, codebook.numel())
            out[f"{name} {key} gaps"] = (gap_symbols(np.flatnonzero(mask), 4), 16)
    return out


def _synthetic(quick: bool, seed: int) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    n = 100_000 if quick else 1_000_000
    out = {}
    for alphabet, scale in ((32, 1.0), (32, 4.0), (256, 16.0)):
        sym = np.clip(np.round(rng.laplace(0, scale, n)) + alphabet // 2, 0, alphabet - 1).astype(np.int64)
        out[f"laplace b={scale:g} ({alphabet} symbols)"] = (sym, alphabet)
    return out


def _row(name: str, symbols: np.ndarray, alphabet: int, zstd: Any) -> dict[str, Any]:
    """Sizes and throughputs of every coder on one stream (round trips checked)."""
    from deepsqueeze.codec import ans, huffman
    from deepsqueeze.codec.entropy import shannon_bits

    n = symbols.size
    mb = n / 1e6
    raw = symbols.astype(np.uint8).tobytes()
    bound = shannon_bits(symbols) / 8
    a = ans.encode(symbols, alphabet)
    h = huffman.encode(symbols, alphabet)
    if not (np.array_equal(ans.decode(a, n, alphabet), symbols) and np.array_equal(huffman.decode(h, n, alphabet),
                                                                                   symbols)):
        raise AssertionError(f"{name}: a coder did not round-trip")
    row: dict[str, Any] = {
        "stream": name, "symbols": n, "alphabet": alphabet, "shannon_bytes": round(bound),
        "ans_bytes": len(a), "ans_vs_bound_pct": round(100 * (len(a) / bound - 1), 2) if bound else None,
        "huffman_bytes": len(h), "huffman_vs_bound_pct": round(100 * (len(h) / bound - 1), 2) if bound else None,
        "zstd19_bytes": len(zstd.compress(raw)), "zlib9_bytes": len(zlib.compress(raw, 9)),
        "ans_enc_MBps": round(mb / _median_time(lambda: ans.encode(symbols, alphabet)), 1),
        "ans_dec_MBps": round(mb / _median_time(lambda: ans.decode(a, n, alphabet)), 1),
        "huff_enc_MBps": round(mb / _median_time(lambda: huffman.encode(symbols, alphabet)), 1),
        "huff_dec_MBps": round(mb / _median_time(lambda: huffman.decode(h, n, alphabet)), 1),
        "zstd19_enc_MBps": round(mb / _median_time(lambda: zstd.compress(raw)), 1),
        "zlib9_enc_MBps": round(mb / _median_time(lambda: zlib.compress(raw, 9)), 1),
    }
    if n >= MIN_SYMBOLS_FOR_TARGET:
        row["target"] = "ANS <= 1% above bound"
        row["met"] = "yes" if len(a) <= 1.01 * bound else "no"
    return row


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import zstandard

    streams = {**_real_streams(ctx.quick), **_synthetic(ctx.quick, ctx.seed)}
    zstd = zstandard.ZstdCompressor(level=19)
    rows = []
    for name, (symbols, alphabet) in streams.items():
        ctx.log(f"entropy-coder: {name}")
        rows.append(_row(name, symbols, alphabet, zstd))
    return rows
