"""Static int8, 4-bit, binary and ternary weights on the Fashion-MNIST CNNs (LeNet-5, vgg-small)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "lenet5-int8"
TITLE = "Fashion-MNIST CNNs: static int8, 4-bit, binary and ternary weights without retraining"
SETUP = (
    "zoo:lenet5@fashion-mnist and zoo:vgg-small@fashion-mnist (the deterministic zoo models). Accuracy on the "
    "full 10k test split; calibration on the first 512 training images (never test). `static int8`: "
    "Conv2d and Linear with per-channel int8 weights and calibrated uint8 activations (percentile 99.99 "
    "observer; BatchNorm folded, ReLU fused; inputs use 7-bit codes because the x86 kernels saturate "
    "full-range uint8 x int8 pairs on AVX2), executed by PyTorch's x86/fbgemm integer kernels, with the codes "
    "passed between convs, poolings and linears as quantized tensors (no float round trip). Peer: torch.ao FX graph-mode static quantization (x86 qconfig, same calibration images). "
    "Weight-only rows (`w4` per channel round-to-nearest, `binary` XNOR-Net, `ternary` TWN) keep packed codes: "
    "their convolutions decode the weight on each call (`--prefer memory`, the default) or once, kept "
    "(`--prefer speed`, the `*_speed` columns: the same .dsq loaded again), their Linear layers run the kernel "
    "raced fastest (`kernels`); no retraining anywhere. Latency: batch 256 test images and batch 1, 2 threads, "
    "every row interleaved with fp32, median of 7. `artifact_kb`: measured .dsq bytes / 1e3."
)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.data import resolve_data

    torch.set_num_threads(ctx.threads)
    data = resolve_data("fashion-mnist")
    rows: list[dict[str, Any]] = []
    names = ["lenet5"] if ctx.quick else ["lenet5", "vgg-small"]
    for name in names:
        rows += _one(name, data, ctx)
    return rows


def _one(name: str, data: Any, ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.eval import accuracy
    from deepsqueeze.eval.latency import measure_latency_interleaved
    from deepsqueeze.quant import Int8StaticConfig, QuantizeConfig, WeightOnlyConfig, quantize_
    from deepsqueeze.resolve import resolve_model

    ref = f"zoo:{name}@fashion-mnist"
    base = resolve_model(ref, progress=False)
    calib = [x for x, _ in data.batches("train", 128, limit=512)]
    batch, one = data.test_x[:256], data.test_x[:1]
    tmp = Path(tempfile.mkdtemp(prefix="lenet5-int8-"))
    base_acc = accuracy(base.module, data)
    fp32_size = save(base, tmp / "fp32.dsq")
    rows = [{"model": name, "method": "fp32", "accuracy": round(base_acc * 100, 2), "drop_pp": 0.0,
             "artifact_kb": round(fp32_size / 1e3, 1), "compress_s": 0.0}]
    runners: dict[str, Any] = {"fp32": lambda: base.module(batch), "fp32 b1": lambda: base.module(one)}
    speed_models: dict[str, Any] = {}
    configs = [("static int8", Int8StaticConfig(observer="percentile", percentile=99.99, calibration_samples=512)),
               ("w4 rtn per-channel", WeightOnlyConfig(bits=4, group_size=None)),
               ("ternary (TWN)", QuantizeConfig(method="ternary")),
               ("binary (XNOR)", QuantizeConfig(method="binary"))]
    if ctx.quick:
        configs = configs[:2]
    for label, config in configs:
        ctx.log(f"lenet5-int8: {name} {label}")
        model = resolve_model(ref, progress=False)
        start = time.perf_counter()
        quantize_(model.module, config, calib)
        compress_s = time.perf_counter() - start
        size = save(model, tmp / "q.dsq")
        loaded = load(tmp / "q.dsq")
        acc = accuracy(loaded.module, data)
        row = {"model": name, "method": label, "accuracy": round(acc * 100, 2),
               "drop_pp": round((base_acc - acc) * 100, 2), "artifact_kb": round(size / 1e3, 1),
               "compress_s": round(compress_s, 2)}
        if label == "static int8":
            runners[label] = lambda m=loaded.module: m(batch)
            row["target"] = "drop <= 0.3 pp and faster than fp32"
        else:  # weight-only: both preferences, batch 256 and 1
            speed_models[label] = fast = load(tmp / "q.dsq").module.eval()
            runners[label] = lambda m=loaded.module: m(batch)
            runners[f"{label} b1"] = lambda m=loaded.module: m(one)
            runners[f"{label} speed"] = lambda m=fast: _preferring_speed(m, batch)
            runners[f"{label} speed b1"] = lambda m=fast: _preferring_speed(m, one)
            row["target"] = "no slower than fp32 at batch 1 and 256" + ("; drop <= 1.0 pp" if label.startswith("w4") else "")
        row["_module"] = loaded.module
        rows.append(row)
    peer = _torch_ao_static(base.module, calib, batch)
    if peer is not None:
        module, compress_s = peer
        acc = accuracy(module, data)
        rows.insert(2, {"model": name, "method": "torch.ao FX static int8", "accuracy": round(acc * 100, 2),
                        "drop_pp": round((base_acc - acc) * 100, 2), "artifact_kb": None,
                        "compress_s": round(compress_s, 2)})
        runners["torch.ao FX static int8"] = lambda: module(batch)
    latency = measure_latency_interleaved(runners, warmup=3, repeat=7, threads=ctx.threads)
    from deepsqueeze.runtime import kernel_summary

    for row in rows:
        method, module = row["method"], row.pop("_module", None)
        ms = latency.get(method)
        if ms is not None:
            row["latency_ms"] = round(ms, 2)
            row["speedup_vs_fp32"] = round(latency["fp32"] / ms, 2)
        if f"{method} b1" in latency:
            row["speedup_b1"] = round(latency["fp32 b1"] / latency[f"{method} b1"], 2)
        if method in speed_models:
            row["speedup_speed"] = round(latency["fp32"] / latency[f"{method} speed"], 2)
            row["speedup_b1_speed"] = round(latency["fp32 b1"] / latency[f"{method} speed b1"], 2)
            row["kernels"] = "; ".join(f"{k} {', '.join(f'{c} x{n}' for c, n in v.items())}"
                                       for k, v in kernel_summary(module).items())
            fast = min(row["speedup_vs_fp32"], row["speedup_b1"]) >= 1.0
            row["met"] = "yes" if fast and (not method.startswith("w4") or row["drop_pp"] <= 1.0) else "no"
        if method == "static int8":
            row["met"] = "yes" if row["drop_pp"] <= 0.3 and row["speedup_vs_fp32"] > 1.0 else "no"
    return rows


def _preferring_speed(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepsqueeze.runtime import preferring

    with preferring("speed"):
        return module(x)


def _torch_ao_static(module: torch.nn.Module, calib: list[torch.Tensor], batch: torch.Tensor
                     ) -> tuple[torch.nn.Module, float] | None:
    """torch.ao FX graph-mode static quantization (the peer); None where this torch lacks it."""
    import warnings

    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        return None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(copy.deepcopy(module).eval(), get_default_qconfig_mapping("x86"), (batch[:1],))
            with torch.no_grad():
                for x in calib:
                    prepared(x)
            quantized = convert_fx(prepared)
        except Exception:  # noqa: BLE001  (a peer that cannot run is reported as missing, not fatal)
            return None
    return quantized, time.perf_counter() - start
