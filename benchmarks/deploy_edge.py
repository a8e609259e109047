"""deploy-edge: the same .dsq as an ExecuTorch program (XNNPACK), as ONNX in ONNX Runtime and in torch."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "deploy-edge"
TITLE = "Edge deployment: ExecuTorch (.pte, XNNPACK) beside ONNX Runtime and torch, from the same .dsq"
SETUP = (
    "zoo:lenet5@fashion-mnist and zoo:vgg-small@fashion-mnist (static int8: percentile 99.99 observer on 512 "
    "training images; w4: 4-bit round-to-nearest per channel; ternary: TWN), all-MiniLM-L6-v2 (int8: per-token "
    "W8A8 on every Linear, int8 embedding rows; w4: 4-bit groups of 32, packed embeddings). Each .dsq is loaded "
    "and exported with `deepsqueeze export --format pte` (XNNPACK delegate: our int8 / 4-bit codes as XNNPACK's "
    "qs8 convolutions, qd8-qc8w and qd8-qc4w/qb4w GEMMs with per-token dynamic int8 activations) and "
    "`--format onnx`; packed convolutions become XNNPACK's dynamic int8 convolution on their codes (8-bit storage: "
    "XNNPACK convolutions take no 4-bit weights); both are verified against the .dsq's torch model before they are timed. Latency: the .dsq in "
    "torch, the ONNX file in ONNX Runtime and the .pte in ExecuTorch's runtime (pybindings), 2 threads each, "
    "interleaved and order-rotating, median of 15 rounds after 3 warm-up calls: CNNs at batch 1 and 256 test "
    "images, MiniLM at 1 sentence and 32 (padded to the longest). `max_err`: largest |output - .dsq output| on 256 "
    "test images / 32 eval sentences (`top1`: class agreement, `cos_min`: worst embedding cosine). "
    "`pte_vs_dsq`: .pte bytes / .dsq bytes. `pte_runs_on`: where the replaced layers run (a program that decodes "
    "packed convolutions on the portable kernels is timed at batch 1 only: its naive convolution takes seconds "
    "per large batch)."
)
TARGET = ("every .pte verified; .pte bytes <= 1.2x the .dsq for int8 and w4; CNN int8 .pte latency at batch 1 <= "
          "our ONNX in ORT")


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.data import resolve_data

    torch.set_num_threads(ctx.threads)
    rows: list[dict[str, Any]] = []
    images = resolve_data("fashion-mnist")
    for name in ["lenet5"] if ctx.quick else ["lenet5", "vgg-small"]:
        rows += _cnn(name, images, ctx)
    if not ctx.quick:
        rows += _minilm(ctx)
    return rows


def _cnn_configs(quick: bool) -> list[tuple[str, Any]]:
    from deepsqueeze.quant import Int8StaticConfig, QuantizeConfig, WeightOnlyConfig

    configs = [("fp32", None),
               ("static int8", Int8StaticConfig(observer="percentile", percentile=99.99, calibration_samples=512)),
               ("w4 rtn per-channel", WeightOnlyConfig(bits=4, group_size=None)),
               ("ternary (TWN)", QuantizeConfig(method="ternary"))]
    return configs[:2] if quick else configs


def _cnn(name: str, data: Any, ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.quant import quantize_
    from deepsqueeze.resolve import resolve_model

    calib = [x for x, _ in data.batches("train", 128, limit=512)]
    test = data.test_x[:256]
    rows = []
    for label, config in _cnn_configs(ctx.quick):
        ctx.log(f"deploy-edge: {name} {label}")
        model = resolve_model(f"zoo:{name}@fashion-mnist", progress=False)
        if config is not None:
            quantize_(model.module, config, calib)
        rows.append(_row(name, label, model, {"batch 1": test[:1], "batch 256": test}, test, ctx))
    return rows


def _minilm(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.data import resolve_data
    from deepsqueeze.quant import Int8DynamicConfig, WeightOnlyConfig, quantize_
    from deepsqueeze.resolve import resolve_model

    sentences = resolve_data("pydoc-sentences:eval", split="eval").sentences[:32]
    rows = []
    for label, config in [("fp32", None), ("int8 per-token", Int8DynamicConfig(activations="per_token")),
                          ("w4 rtn g32", WeightOnlyConfig(bits=4, group_size=32))]:
        ctx.log(f"deploy-edge: minilm {label}")
        model = resolve_model("minilm", progress=False)
        if config is not None:
            quantize_(model.module, config)
        one, many = model.module.tokenize(sentences[:1]), model.module.tokenize(sentences)
        rows.append(_row("minilm", label, model, {"batch 1": one, "batch 32": many}, many, ctx))
    return rows


def _row(name: str, label: str, model: Any, batches: dict[str, Any], check: Any, ctx: BenchContext) -> dict[str, Any]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.errors import DeepsqueezeError
    from deepsqueeze.eval.latency import measure_latency_spread
    from deepsqueeze.export import export
    from deepsqueeze.export.onnx import OrtModule
    from deepsqueeze.export.pte import PteModule

    tmp = Path(tempfile.mkdtemp(prefix="deploy-edge-"))
    dsq_bytes = save(model, tmp / "m.dsq")
    loaded = load(tmp / "m.dsq")
    row: dict[str, Any] = {"model": name, "method": label, "dsq_kb": round(dsq_bytes / 1e3, 1)}
    runners: dict[str, Any] = {"torch": loaded.module}
    for fmt, runner in (("pte", PteModule), ("onnx", OrtModule)):
        try:
            result = export(loaded, fmt, tmp / f"m.{fmt}", sample=check, threads=ctx.threads)
        except DeepsqueezeError as exc:
            row[f"{fmt}"] = f"refused: {exc}"
            continue
        row[f"{fmt}_kb"] = round(result.bytes / 1e3, 1)
        row[f"{fmt}_worst_1-cos"] = f"{result.check['worst_cosine_distance']:.1e}"
        runners[fmt] = runner(result.path, loaded.module, ctx.threads)
        if fmt == "pte":
            row["pte_vs_dsq"] = round(result.bytes / dsq_bytes, 3)
            row["pte_runs_on"] = "; ".join(sorted({r["runs_on"] for r in result.layers})) or "XNNPACK (float)"
    with torch.inference_mode():
        reference = _call(loaded.module, check)
        for fmt in ("pte", "onnx"):
            if fmt in runners:
                out = _call(runners[fmt], check)
                row[f"{fmt}_max_err"] = round(float((out - reference).abs().max()), 5)
                if isinstance(check, torch.Tensor):
                    row[f"{fmt}_top1"] = round(float((out.argmax(1) == reference.argmax(1)).double().mean()), 4)
                else:
                    row[f"{fmt}_cos_min"] = round(float(torch.nn.functional.cosine_similarity(out, reference).min()), 5)
        decoded = "convolution" in row.get("pte_runs_on", "")  # a portable (naive) convolution
        for kind, batch in batches.items():
            fns = {rt: (lambda m=m, b=batch: _call(m, b)) for rt, m in runners.items()
                   if not (rt == "pte" and decoded and kind != "batch 1")}
            spread = measure_latency_spread(fns, warmup=3, repeat=15, threads=ctx.threads)
            for rt, stats in spread.items():
                row[f"{rt}_ms_{kind.replace('batch ', 'b')}"] = round(stats.median, 3)
    if "pte" in runners and "onnx" in runners and label.startswith(("static int8", "int8", "w4")):
        met = row["pte_vs_dsq"] <= 1.2
        if name != "minilm" and label.startswith("static int8"):
            met = met and row["pte_ms_b1"] <= row["onnx_ms_b1"]
        row["target_met"] = met
    return row


def _call(module: Any, batch: Any) -> torch.Tensor:
    out = module(**batch) if isinstance(batch, dict) else module(batch)
    return out if isinstance(out, torch.Tensor) else out[0]
