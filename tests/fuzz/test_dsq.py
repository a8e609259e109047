"""Structure-aware fuzzing of the .dsq loader (issue 15 finding 7, issue 25 round three).

Each case edits a valid artifact the way an attacker would, then ``load``s it and runs the model:

* ``manifest``: a field's type swapped, a number huge, negative or off by one, deep nesting, names swapped,
  keys dropped or added, planted references (every checksum and the digest recomputed);
* ``ties``: aliases and sources swapped, tied to a tensor of another shape or dtype, to itself, in chains,
  to names that are stored or do not exist;
* ``geometry``: the params of a quantized module's replay (``stride``, ``padding``, ``dilation``, ``groups``,
  channel and feature counts, ``bits``, ``group_size``, ``cls``) deleted, a bool for an int, another type,
  off by one, lists lengthened or shortened;
* ``amplify``: list entries (coverage, transforms, stages, tensors, fingerprint, segments, ties) duplicated
  from 2 to 100,000 times;
* ``reseal``: raw damage to manifest or payload bytes, resealed (header CRC and digest recomputed) or not;
* ``payload``: payload bytes damaged and every segment CRC and the digest recomputed, so only the decoders
  stand between the bytes and the model.

Seeds: TinyMLP with every entropy / codebook / sparse encoding, pruned + int8 dynamic, packed 4-bit linear,
TinyBNConvNet with int8 static convolutions (``Int8Conv2d``) and packed 4-bit convolutions, and a tied LM.
The oracle (``tests/fuzz/oracle.py``): ``ArtifactError`` / ``ModelError`` only; a loaded model runs to finite
outputs on its own input.
"""

from __future__ import annotations

import copy
import json
import os
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.codec.format import DEFLATED_FROM, FORMAT_VERSION
from deepsqueeze.core.outputs import output_tensors
from deepsqueeze.core.record import record_encoding
from deepsqueeze.errors import ArtifactError, ModelError
from deepsqueeze.testing.forge import assemble_artifact, split_artifact
from tests.fuzz.oracle import (
    Campaign,
    Canary,
    ForwardFailure,
    case_rng,
    mutate_json,
    off_by_one,
    random_value,
)

SURFACE = "dsq"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_CASES", "1000"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))

TINY = "py:deepsqueeze.testing.models:TinyMLP"
CNN = "py:deepsqueeze.testing.quant_models:TinyBNConvNet"
TIED = "py:deepsqueeze.testing.user_models:TiedLM"
KINDS = ["manifest", "ties", "geometry", "amplify", "reseal", "payload"]
WEIGHTS = [24, 12, 18, 10, 18, 18]
GEOMETRY_KEYS = ["stride", "padding", "dilation", "groups", "in_channels", "out_channels", "kernel_size",
                 "in_features", "out_features", "bits", "group_size", "bias", "relu", "quantized_output", "act",
                 "smooth", "binary", "cls", "num_embeddings", "embedding_dim", "padding_idx"]


def _seeds(tmp: Path) -> list[tuple[str, str, torch.Tensor]]:
    """(path, model code, probe input) of each seed artifact."""
    from deepsqueeze.prune.surgery import cut_
    from deepsqueeze.quant import Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig, quantize_
    from deepsqueeze.testing.models import tiny_model_handle
    from deepsqueeze.testing.quant_models import tiny_bn_convnet_handle
    from deepsqueeze.zoo.resolve import resolve_base_model

    seeds = []
    torch.manual_seed(0)
    coded = tiny_model_handle()
    with torch.no_grad():
        for name, p in coded.module.named_parameters():
            levels = (p * 4).round() / 4
            if name in ("fc1.weight", "fc3.weight"):
                levels[levels.abs() < 0.25] = 0
            p.copy_(levels)
    for name, enc in [("fc1.weight", "sparse-codebook-entropy"), ("fc2.weight", "codebook"),
                      ("fc3.weight", "sparse"), ("fc1.bias", "codebook-entropy"), ("fc2.bias", "sparse-codebook")]:
        record_encoding(coded.module, name, enc)
    mlp_x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    save(coded, tmp / "coded.dsq")
    seeds.append((str(tmp / "coded.dsq"), TINY, mlp_x))
    pruned = tiny_model_handle()
    cut_(pruned.module, "fc1", "out", list(range(0, 32, 2)))
    cut_(pruned.module, "fc2", "in", list(range(0, 32, 2)))
    quantize_(pruned.module, Int8DynamicConfig())
    save(pruned, tmp / "int8.dsq")
    seeds.append((str(tmp / "int8.dsq"), TINY, mlp_x))
    packed = tiny_model_handle()
    quantize_(packed.module, WeightOnlyConfig(bits=4, group_size=8))
    save(packed, tmp / "w4.dsq")
    seeds.append((str(tmp / "w4.dsq"), TINY, mlp_x))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(2)]
    cnn_x = torch.randn(2, 1, 8, 8, generator=g)
    static = tiny_bn_convnet_handle()
    quantize_(static.module, Int8StaticConfig(), calib)  # Int8Conv2d with folded BN, fused ReLU
    save(static, tmp / "cnn-int8.dsq")
    seeds.append((str(tmp / "cnn-int8.dsq"), CNN, cnn_x))
    packed_conv = tiny_bn_convnet_handle()
    quantize_(packed_conv.module, WeightOnlyConfig(bits=4, group_size=8))  # PackedIntConv2d
    save(packed_conv, tmp / "cnn-w4.dsq")
    seeds.append((str(tmp / "cnn-w4.dsq"), CNN, cnn_x))
    tied = resolve_base_model(TIED, progress=False)
    quantize_(tied.module, Int8DynamicConfig(include=("proj",)))
    save(tied, tmp / "tied.dsq")
    seeds.append((str(tmp / "tied.dsq"), TIED, torch.randint(0, 200, (2, 5), generator=g)))
    return seeds


# --- mutations ---------------------------------------------------------------------------------------------------

def _names(manifest: dict[str, Any]) -> list[str]:
    return [t["name"] for t in manifest.get("tensors", []) if isinstance(t, dict) and "name" in t]


def _model_names(manifest: dict[str, Any]) -> list[str]:
    fingerprint = (manifest.get("base") or {}).get("fingerprint") or {}
    return [t[0] for t in fingerprint.get("tensors", [])] + _names(manifest)


def _mutate_ties(rng: random.Random, manifest: dict[str, Any]) -> None:
    ties: dict[str, str] = manifest.setdefault("ties", {})
    stored = _names(manifest)
    names = sorted(set(_model_names(manifest))) or ["x"]
    for _ in range(rng.choice([1, 1, 2])):
        op = rng.randrange(9)
        if op == 0 and ties:  # swap alias and source (the stored entry keeps its name)
            alias = rng.choice(sorted(ties))
            ties[ties.pop(alias)] = alias
        elif op == 1 and ties:  # swap roles and rename the stored entry too: an equivalent file
            alias = rng.choice(sorted(ties))
            source = ties.pop(alias)
            for entry in manifest["tensors"]:
                if entry.get("name") == source:
                    entry["name"] = alias
            ties[source] = alias
        elif op == 2:  # tie two tensors of the model, whatever their shapes
            ties[rng.choice(names)] = rng.choice(stored or names)
        elif op == 3 and stored:  # drop a stored tensor and tie its name to another one
            victim = rng.choice(stored)
            manifest["tensors"] = [e for e in manifest["tensors"] if e.get("name") != victim]
            ties[victim] = rng.choice([n for n in stored if n != victim] or [victim])
        elif op == 4:
            name = rng.choice(names)
            ties[name] = name  # to itself
        elif op == 5 and len(names) >= 3:  # a chain a -> b -> c
            a, b, c = rng.sample(names, 3)
            ties.update({a: b, b: c})
        elif op == 6 and ties:
            alias = rng.choice(sorted(ties))
            ties[alias] = rng.choice(["", "nope", "..", alias + ".", "lm_head", "embed", rng.choice(names)])
        elif op == 7 and ties:
            del ties[rng.choice(sorted(ties))]  # an alias left without a value
        else:
            manifest["ties"] = random_value(rng, names)


def _quant_transforms(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in manifest.get("transforms", []) if isinstance(t, dict) and isinstance(t.get("params"), dict)
            and t["params"]]


def _mutate_geometry(rng: random.Random, manifest: dict[str, Any]) -> None:
    transforms = _quant_transforms(manifest)
    if not transforms:
        mutate_json(rng, manifest, _names(manifest), focus=lambda p: p[0] == "transforms")
        return
    for _ in range(rng.choice([1, 1, 2, 3])):
        params = rng.choice(transforms)["params"]
        key = rng.choice(sorted(params) + rng.sample(GEOMETRY_KEYS, 2))
        current = params.get(key)
        op = rng.randrange(8)
        if op == 0 and key in params:
            del params[key]
        elif op == 1:  # a bool for an int (True == 1 in Python), in lists too
            params[key] = [True] * len(current) if isinstance(current, list) else rng.choice([True, False])
        elif op == 2:
            params[key] = rng.choice(["1", 1.0, 1.5, None, [], {}, [1], [1, 1, 1], [[1, 1]], -1, 0, 2**31, 10**6,
                                      "Int8Conv2d", "PackedIntConv2d", "Int8Linear", "PackedIntLinear"])
        elif op == 3 and current is not None:
            params[key] = off_by_one(rng, current)
        elif op == 4 and isinstance(current, list) and current:
            params[key] = [rng.choice([0, -1, 2, 3, 2**31, 1.0, True]) for _ in current]
        elif op == 5:  # another module class with the same params
            params["cls"] = rng.choice(["Int8Conv2d", "PackedIntConv2d", "Int8Linear", "PackedIntLinear",
                                        "Int8Embedding", "PackedIntEmbedding", "TernaryLinear", "nn.Conv2d"])
        elif op == 6:  # the transform moved to another target
            rng.choice(transforms)["target"] = rng.choice(["0", "1", "3", "8", "fc1", "fc2", "fc3", "proj", "embed",
                                                           "lm_head", "", "0.weight"])
        else:
            params[key] = random_value(rng, _names(manifest))


_AMPLIFIABLE = ("coverage", "transforms", "stages", "tensors")
_MARK = "__amplified__"
MAX_AMPLIFIED_BYTES = 6 << 20


def _mutate_amplify(rng: random.Random, manifest: dict[str, Any]) -> dict[str, str]:
    """Plant a marker where copies go; return {marker JSON: the copies' JSON} (joined as text, so the harness
    never holds 100,000 Python objects: its own memory would count in the oracle's RSS bound)."""
    factor = rng.choice([2, 10, 64, 65, 1000, 10_000, 100_000])
    op = rng.randrange(5)
    if op <= 1:
        key = rng.choice([k for k in _AMPLIFIABLE if manifest.get(k)] or ["transforms"])
        items = manifest.get(key) or [{"kind": "quant.identity", "target": "fc1", "params": {}}]
        item = json.dumps(items[rng.randrange(len(items))], sort_keys=True, separators=(",", ":"))
        factor = min(factor, MAX_AMPLIFIED_BYTES // len(item))  # just past the loader's 4 MB manifest floor
        manifest[key] = [*items, _MARK]
        if key == "tensors" and rng.random() < 0.5:  # renamed copies: unique names, shared segments
            name = json.loads(item)["name"]
            copies = ",".join(item.replace(json.dumps(name), json.dumps(f"{name}.{i}"), 1) for i in range(factor))
        else:
            copies = ",".join([item] * factor)
        return {json.dumps(_MARK): copies}
    if op == 2:
        fingerprint = (manifest.get("base") or {}).get("fingerprint")
        if isinstance(fingerprint, dict):
            field = rng.choice(["modules", "tensors"])
            fingerprint[field] = fingerprint[field] * min(factor, 2000)
        else:
            manifest["stages"] = [{}] * min(factor, 2000)
    elif op == 3 and manifest.get("tensors"):
        entry = rng.choice(manifest["tensors"])
        entry["segments"] = entry["segments"] * min(factor, 64)
        if rng.random() < 0.5:
            entry["shape"] = entry["shape"] * min(factor, 16)
    else:
        names = _model_names(manifest) or ["x"]
        manifest["ties"] = {f"{rng.choice(names)}.{i}": rng.choice(names) for i in range(min(factor, 20_000))}
    return {}


def _mutate_manifest(rng: random.Random, manifest: dict[str, Any], canary: Canary) -> None:
    strings = _names(manifest) + [r for r in canary.references() if r != str(canary.secret)]
    mutate_json(rng, manifest, strings, focus=lambda p: p[0] in ("transforms", "tensors", "base", "ties", "ref"))


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
        target = rng.choice([version] * 5 + [1, 2, FORMAT_VERSION + 1, 0])
        head, tail = bytes(body[:mlen]), bytes(body[mlen:])
        if target >= DEFLATED_FROM and rng.random() < 0.3:  # the deflate stream itself damaged, then resealed
            stored = bytearray(zlib.compress(head, 9))
            stored[rng.randrange(len(stored))] ^= 1 << rng.randrange(8)
            return assemble_artifact(bytes(stored[: rng.choice([len(stored), rng.randrange(len(stored))])]), tail,
                                     target, stored=True)
        return assemble_artifact(head, tail, target)
    damaged = bytearray(data)
    if damaged:
        damaged[rng.randrange(len(damaged))] ^= 0xFF
    return bytes(damaged[: rng.randint(0, len(damaged))]) if rng.random() < 0.3 else bytes(damaged)


def _mutate_payload(rng: random.Random, data: bytes) -> bytes:
    """Damage one or more tensors' segments and recompute their CRCs and the digest."""
    version, manifest_bytes, payload = split_artifact(data)
    manifest = json.loads(manifest_bytes)
    body = bytearray(payload)
    entries = [e for e in manifest["tensors"] if e["segments"]]
    for _ in range(rng.choice([1, 1, 2, 4])):
        entry = rng.choice(entries)
        offset, length, _ = rng.choice(entry["segments"])
        if not length:
            continue
        pos = offset + rng.randrange(length)
        op = rng.randrange(5)
        if op == 0:
            body[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            body[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80])
        elif op == 2:  # a float32 NaN / Inf / huge / denormal where floats live
            start = offset + 4 * rng.randrange(max(1, length // 4))
            body[start : start + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f",
                                                  b"\x01\x00\x00\x00", b"\x00\x00\x80\xff"])[: len(body) - start]
        elif op == 3:  # a run of random bytes
            run = min(length - (pos - offset), rng.randint(1, 64))
            body[pos : pos + run] = bytes(rng.randrange(256) for _ in range(run))
        else:  # zeros
            run = min(length - (pos - offset), rng.randint(1, 256))
            body[pos : pos + run] = bytes(run)
    for entry in manifest["tensors"]:
        entry["segments"] = [[o, n, zlib.crc32(bytes(body[o : o + n]))] for o, n, _ in entry["segments"]]
    return assemble_artifact(manifest, bytes(body), version)


def mutate(rng: random.Random, data: bytes, manifest: dict[str, Any], canary: Canary) -> tuple[str, bytes | None]:
    kind = rng.choices(KINDS, WEIGHTS)[0]
    if kind == "reseal":
        return kind, _mutate_bytes(rng, data)
    if kind == "payload":
        return kind, _mutate_payload(rng, data)
    edited = copy.deepcopy(manifest)
    replace: dict[str, str] = {}
    if kind == "manifest":
        _mutate_manifest(rng, edited, canary)
    elif kind == "ties":
        _mutate_ties(rng, edited)
    elif kind == "geometry":
        _mutate_geometry(rng, edited)
    else:
        replace = _mutate_amplify(rng, edited)
    try:
        text = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return kind, None
    for marker, copies in replace.items():
        text = text.replace(marker, copies)
    version, _, payload = split_artifact(data)
    return kind, assemble_artifact(text.encode(), payload, version)


# --- the campaign ------------------------------------------------------------------------------------------------

def _check_forward(model: Any, x: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            out = output_tensors(model.module(x))
    except Exception as exc:  # noqa: BLE001 - a loaded model that does not run is the finding
        raise ForwardFailure(f"loaded, then forward raised {type(exc).__name__}: {str(exc)[:200]}") from None
    if not all(bool(torch.isfinite(t).all()) for t in out if t.is_floating_point()):
        raise ForwardFailure("loaded, then computed NaN or Inf")


def run_campaign(cases: int, seed: int, tmp: Path, start: int = 0, progress: Any = None) -> dict[str, Any]:
    """Run cases ``start .. start + cases - 1``; return the surface's counts (``failures`` empty = target met)."""
    tmp = Path(tmp)
    canary = Canary(tmp / "canary")
    seeds = _seeds(tmp)
    originals = [(Path(p).read_bytes(), json.loads(split_artifact(Path(p).read_bytes())[1]), code, x)
                 for p, code, x in seeds]
    for path, code, x in seeds:  # warm-up: imports, plugin registration, kernels
        _check_forward(load(path, model=code), x)
    campaign = Campaign(SURFACE, canary, (ArtifactError, ModelError))
    campaign.warmed()
    case_path = tmp / "case.dsq"
    for case in range(start, start + cases):
        if progress:
            progress(case)
        rng = case_rng(SURFACE, seed, case)
        data, manifest, code, x = rng.choice(originals)
        kind, blob = mutate(rng, data, manifest, canary)
        if blob is None:
            continue
        case_path.write_bytes(blob)
        campaign.case(case, kind, lambda: _check_forward(load(case_path, model=code), x))  # noqa: B023 - called at once
        if campaign.stop:
            break
    result = campaign.result()
    result["seed_bytes"] = max(len(d) for d, *_ in originals)
    return result


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_artifacts_fail_cleanly(tmp_path):
    result = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert result["failures"] == [], result["failures"][:5]
    assert result["documented"].get("ArtifactError", 0) > result["cases"] // 2  # the mutations reach the checks
    assert all(result["kinds"].get(kind, 0) > 0 for kind in KINDS), result["kinds"]
    assert result["ok"] > 0  # some mutations are harmless (or equivalent) and load
