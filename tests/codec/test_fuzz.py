"""Structure-aware fuzzing of the .dsq loader (issue 15 finding 7).

Each case edits a valid artifact the way an attacker would: a manifest field (type swapped, huge,
negative or off-by-one numbers, deep nesting, names swapped, keys dropped or added, transform params
changed) with every checksum and the digest recomputed, or raw byte damage (flips, truncation,
insertion), resealed or not. The target: ``load`` raises nothing but ``ArtifactError`` (or ``ModelError``
when an edited fingerprint no longer matches the caller's code), never hangs, never grows the process
beyond a small bound, and a model that loads runs its forward pass.

``make test`` runs ``DEEPSQUEEZE_FUZZ_CASES`` cases (default 1500, a few seconds); ``make fuzz`` runs a long
campaign. ``DEEPSQUEEZE_FUZZ_SEED`` picks the random stream.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core.record import record_encoding
from deepsqueeze.errors import ArtifactError, ModelError
from deepsqueeze.testing.forge import assemble_artifact, split_artifact
from deepsqueeze.testing.models import tiny_model_handle

TINY = "py:deepsqueeze.testing.models:TinyMLP"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_CASES", "1500"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))
HANG_S = 10  # no single load may take this long
RSS_SLACK_MB = 256  # peak RSS may not grow by more than this over the warm-up peak


def _seeds(tmp: Path) -> list[Path]:
    from deepsqueeze.prune.surgery import cut_
    from deepsqueeze.quant import Int8DynamicConfig, WeightOnlyConfig, quantize_

    paths = []
    torch.manual_seed(0)
    coded = tiny_model_handle()
    with torch.no_grad():
        for name, p in coded.module.named_parameters():
            levels = (p * 4).round() / 4
            if name == "fc1.weight" or name == "fc3.weight":
                levels[levels.abs() < 0.25] = 0
            p.copy_(levels)
    for name, enc in [("fc1.weight", "sparse-codebook-entropy"), ("fc2.weight", "codebook"),
                      ("fc3.weight", "sparse"), ("fc1.bias", "codebook-entropy"), ("fc2.bias", "sparse-codebook")]:
        record_encoding(coded.module, name, enc)
    save(coded, tmp / "coded.dsq")
    paths.append(tmp / "coded.dsq")
    pruned = tiny_model_handle()
    cut_(pruned.module, "fc1", "out", list(range(0, 32, 2)))
    cut_(pruned.module, "fc2", "in", list(range(0, 32, 2)))
    quantize_(pruned.module, Int8DynamicConfig())
    save(pruned, tmp / "int8.dsq")
    paths.append(tmp / "int8.dsq")
    packed = tiny_model_handle()
    quantize_(packed.module, WeightOnlyConfig(bits=4, group_size=8))
    save(packed, tmp / "w4.dsq")
    paths.append(tmp / "w4.dsq")
    return paths


_HUGE = [10**30, -(10**30), 2**63, 2**64 + 1, -1, 0, 10**9, 2**31, 1e308, -0.0, float("1e-300")]


def _random_value(rng: random.Random, names: list[str]) -> Any:
    pick = rng.randrange(12)
    if pick == 0:
        return rng.choice(_HUGE)
    if pick == 1:
        return rng.randint(-3, 70)
    if pick == 2:
        return rng.choice(names) if names else "x"
    if pick == 3:
        return rng.choice(["", "os:abort", "sys:exit", "../../etc/passwd", "\x00", "é" * 3, "int32", "float16",
                           "uint16", "csr", "bitmap", "fixed", "huffman", "raw", "codebook", "zoo", "py", "hf"])
    if pick == 4:
        return None
    if pick == 5:
        return rng.choice([True, False])
    if pick == 6:
        return []
    if pick == 7:
        return {}
    if pick == 8:
        value: Any = 1
        for _ in range(rng.choice([5, 40, 200])):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    if pick == 9:
        return [rng.randint(-2, 40) for _ in range(rng.randint(0, 5))]
    if pick == 10:
        return rng.uniform(-1e6, 1e6)
    return [rng.randint(0, 1 << 20), rng.randint(0, 4096), rng.randint(0, 2**32)]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            out += _paths(v, (*prefix, i))
    return out


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def _mutate_manifest(rng: random.Random, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(manifest)
    names = [t["name"] for t in manifest.get("tensors", [])]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = [p for p in _paths(manifest) if p]
        if rng.random() < 0.4:  # favour what loads structure: transforms, tensor entries, base
            focus = [p for p in paths if p[0] in ("transforms", "tensors", "base", "ties")]
            paths = focus or paths
        path = rng.choice(paths)
        parent, key = _get(manifest, path[:-1]), path[-1]
        current = parent[key]
        op = rng.randrange(6)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(current, int) and not isinstance(current, bool):
            parent[key] = rng.choice([current + 1, current - 1, -current, current * 1000, current + 2**32, 0])
        elif op == 2 and isinstance(current, list) and current:
            if rng.random() < 0.5:
                current.append(copy.deepcopy(rng.choice(current)))
            else:
                current.pop(rng.randrange(len(current)))
        elif op == 3 and isinstance(current, dict):
            current[rng.choice(["extra", "factory", "kind", "cls", "nnz", "k", "idx", "pos"])] = _random_value(rng, names)
        else:
            parent[key] = _random_value(rng, names)
    return manifest


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    version, manifest, payload = split_artifact(data)
    body = bytearray(manifest + payload)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(body)) if body else 0
        if op == 0 and body:
            body[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del body[pos : pos + rng.randint(1, 16)]
        else:
            body[pos : pos + 1] = rng.choice([b"9" * 30, b"[", b"{", b"-", b'"', b"e99", b"\xff"])
    mlen = len(manifest) + rng.choice([0, 0, 0, -1, 1, rng.randint(-50, 50)])
    mlen = max(0, min(len(body), mlen))
    if rng.random() < 0.8:  # resealed: checksums and digest match, so parsing and schema must cope
        return assemble_artifact(bytes(body[:mlen]), bytes(body[mlen:]), version)
    damaged = bytearray(data)
    if damaged:
        damaged[rng.randrange(len(damaged))] ^= 0xFF
    return bytes(damaged[: rng.randint(0, len(damaged))]) if rng.random() < 0.3 else bytes(damaged)


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def run_campaign(cases: int, seed: int, tmp: Path) -> dict[str, Any]:
    """Run ``cases`` mutations; return counts and the first failures (empty ``failures`` = target met)."""
    seeds = _seeds(tmp)
    originals = [(p.read_bytes(), json.loads(split_artifact(p.read_bytes())[1])) for p in seeds]
    x = torch.randn(3, 16)
    for path in seeds:  # warm-up: imports, plugin registration, kernels
        load(path, model=TINY).module(x)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng = random.Random(seed)
    stats: dict[str, Any] = {"cases": 0, "loaded": 0, "artifact_errors": 0, "model_errors": 0, "failures": [],
                             "hangs": 0, "slowest_s": 0.0, "peak_rss_growth_mb": 0.0}
    case_path = tmp / "case.dsq"
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(cases):
            data, manifest = rng.choice(originals)
            if rng.random() < 0.7:
                version = split_artifact(data)[0]
                mutated = _mutate_manifest(rng, manifest)
                try:
                    body = json.dumps(mutated, sort_keys=True, separators=(",", ":")).encode()
                except (ValueError, RecursionError):
                    continue
                blob = assemble_artifact(body, split_artifact(data)[2], version)
                kind = "manifest"
            else:
                blob, kind = _mutate_bytes(rng, data), "bytes"
            case_path.write_bytes(blob)
            stats["cases"] += 1
            start = time.perf_counter()
            signal.alarm(HANG_S)
            try:
                model = load(case_path, model=TINY)
                with torch.no_grad():
                    model.module(x)
                stats["loaded"] += 1
            except ArtifactError:
                stats["artifact_errors"] += 1
            except ModelError:
                stats["model_errors"] += 1
            except Hang:
                stats["hangs"] += 1
                stats["failures"].append((case, kind, "hang"))
            except BaseException as exc:  # noqa: BLE001 - the finding is whatever escaped
                stats["failures"].append((case, kind, f"{type(exc).__name__}: {str(exc)[:200]}"))
            finally:
                signal.alarm(0)
            stats["slowest_s"] = max(stats["slowest_s"], time.perf_counter() - start)
            growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
            stats["peak_rss_growth_mb"] = max(stats["peak_rss_growth_mb"], growth)
            if growth > RSS_SLACK_MB:
                stats["failures"].append((case, kind, f"peak RSS grew by {growth:.0f} MB"))
                break
            if len(stats["failures"]) >= 20:
                break
    finally:
        signal.signal(signal.SIGALRM, old)
    stats["file_bytes"] = max(len(d) for d, _ in originals)
    return stats


def test_fuzzed_artifacts_fail_cleanly(tmp_path):
    stats = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in stats.items() if k != "failures"}))
    assert stats["failures"] == [], stats["failures"][:5]
    assert stats["artifact_errors"] > stats["cases"] // 2  # the mutations really reach the checks


if __name__ == "__main__":  # a long campaign outside pytest: python tests/codec/test_fuzz.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_campaign(CASES, SEED, Path(tmp))
    print(json.dumps(result, indent=1, default=str))
    raise SystemExit(1 if result["failures"] else 0)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
