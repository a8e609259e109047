"""MiniLM int8: fp32, torch.ao dynamic, ONNX Runtime dynamic per-channel, deepsqueeze int8 (torch and ORT)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "minilm-int8"
TITLE = "MiniLM int8: deepsqueeze W8A8 vs torch.ao and ONNX Runtime dynamic quantization"
SETUP = (
    "all-MiniLM-L6-v2. Fidelity: embeddings of the `pydoc-sentences:eval` sentences (never used for "
    "calibration) against fp32 torch: cosine mean/min, agreement of the 10 nearest neighbours. Latency: one "
    "batch of the first 32 eval sentences (padded to the longest), torch.set_num_threads(2) and ORT "
    "intra_op_num_threads=2, 2 warm-up calls, median of 5, all rows interleaved (A B A B). "
    "Peers: `torch.ao.quantization.quantize_dynamic` (Linear, qint8) and ONNX Runtime `quantize_dynamic` "
    "(per_channel=True, QInt8 weights) on the plain exported fp32 graph. deepsqueeze rows quantize every "
    "Linear to int8 per output channel and the embedding tables to int8 rows; `torch` runs our Int8Linear "
    "eagerly with the kernel measured fastest on this CPU (AVX2 without VNNI: fbgemm on weights packed "
    "from our codes at load, per-token 7-bit activation codes; torch._int_mm is ~20x slower than fp32 "
    "here, so the _int_mm rows are not timed); the SmoothQuant row first migrates activation outliers into "
    "the weights (alpha 0.5, calibrated on 256 `pydoc-sentences:calib` sentences); `our ONNX export` rows are "
    "`deepsqueeze export --format onnx` of the same .dsq (MatMulInteger on our int8 codes with the model's own "
    "activation scheme: per-token rows quantized per row in the graph; int8 embedding tables), run in ORT. "
    "`batch_invariance`: worst 1 - cos between a sentence embedded alone and inside a batch of 64 (8 sentences). "
    "`onnx_mb`: the ONNX file's bytes / 1e6. `our ExecuTorch export`: `deepsqueeze export --format pte` of the "
    "per-token .dsq (XNNPACK qd8-qc8w GEMMs on our int8 codes, per-token asymmetric dynamic activations), run by "
    "ExecuTorch's runtime (pybindings); `pte_mb`: the program's bytes / 1e6. "
    "`ideal_mb`: bits x parameters (8 per int8 code, 32 per float parameter, scales not counted). "
    "`artifact_mb`: measured .dsq bytes / 1e6 (the ONNX file for the ORT peer; torch.ao has no file). "
    "`compress_s`: quantization wall time (plus calibration, plus export for ORT rows)."
)
TARGET = ("cosine_mean >= 0.995, cosine_min >= 0.99, batch_invariance <= 1e-4, >= 1.15x faster than the fastest "
          "peer (torch.ao dynamic, ORT quantize_dynamic), file (ONNX / .pte for those rows) <= 25 MB")


def _mb(n: float) -> float:
    return round(n / 1e6, 2)


def _ideal_mb(module: torch.nn.Module) -> float:
    """Bits x parameters: 1 byte per int8 code, 4 per float parameter; scales and smoothing vectors not counted."""
    total = 0
    for name, tensor in module.state_dict().items():
        if tensor.dtype in (torch.int8, torch.uint8):
            total += tensor.numel()
        elif tensor.is_floating_point() and not name.endswith(("scale", "smooth")):
            total += 4 * tensor.numel()
    return _mb(total)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import copy

    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.calibrate import calibration_batches
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import embedding_fidelity
    from deepsqueeze.eval.latency import measure_latency_interleaved
    from deepsqueeze.export import export
    from deepsqueeze.export.onnx import OrtModule, write_onnx
    from deepsqueeze.quant import Int8DynamicConfig, SmoothQuantConfig, quantize_
    from deepsqueeze.resolve import resolve_model

    torch.set_num_threads(ctx.threads)
    sentences = resolve_data("pydoc-sentences:eval").sentences
    if ctx.quick:
        sentences = sentences[:128]
    base = resolve_model("minilm", progress=False)
    fp32 = base.module.eval()
    with torch.no_grad():
        ref = fp32.encode(sentences)
    tokens = fp32.tokenize(sentences[:32])
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="minilm-int8-"))

    def fidelity(module: Any) -> dict[str, float]:
        with torch.no_grad():
            emb = module.encode(sentences)
        return {k: round(float(v), 4) for k, v in embedding_fidelity(emb, ref).items()}

    def invariance(module: Any) -> dict[str, float]:
        """Worst 1 - cos between a sentence embedded alone and inside a batch of 64 (8 sentences)."""
        batch = sentences[:64]
        with torch.no_grad():
            together = module.encode(batch, batch_size=64)
            alone = torch.cat([module.encode([s]) for s in batch[:8]])
        cos = torch.nn.functional.cosine_similarity(alone.double(), together[:8].double())
        return {"batch_invariance": float((1 - cos).max())}

    save(base, tmp / "fp32.dsq")
    rows["fp32 torch"] = {"cosine_mean": 1.0, "cosine_min": 1.0, "neighbor_agreement_at_10": 1.0,
                          "ideal_mb": _ideal_mb(fp32),
                          "artifact_mb": _mb((tmp / "fp32.dsq").stat().st_size), "compress_s": 0.0}
    runners["fp32 torch"] = lambda: fp32(**tokens)

    ctx.log("minilm-int8: torch.ao quantize_dynamic")
    start = time.perf_counter()
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    rows["torch.ao dynamic"] = {**fidelity(ao), "artifact_mb": None,
                                "compress_s": round(time.perf_counter() - start, 1)}
    runners["torch.ao dynamic"] = lambda: ao(**tokens)

    ctx.log("minilm-int8: ORT quantize_dynamic per-channel")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    write_onnx(base, tmp / "fp32.onnx", fp32.tokenize(sentences[:4]))
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "ort_dyn.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    ort_peer = OrtModule(tmp / "ort_dyn.onnx", fp32, ctx.threads)
    rows["ORT quantize_dynamic per-channel"] = {**fidelity(ort_peer), **invariance(ort_peer), "onnx_mb": _mb((tmp / "ort_dyn.onnx").stat().st_size), "artifact_mb": _mb((tmp / "ort_dyn.onnx").stat().st_size),
                                                "compress_s": round(time.perf_counter() - start, 1)}
    runners["ORT quantize_dynamic per-channel"] = lambda: ort_peer(**tokens)

    calib = resolve_data("pydoc-sentences:calib")
    variants = {"per_token": Int8DynamicConfig(activations="per_token"),
                "per_token + SmoothQuant a=0.5": SmoothQuantConfig(alpha=0.5, calibration_samples=256),
                "per_tensor": Int8DynamicConfig(activations="per_tensor")}
    for act, config in variants.items():
        ctx.log(f"minilm-int8: deepsqueeze int8 ({act})")
        model = resolve_model("minilm", progress=False)
        start = time.perf_counter()
        batches = calibration_batches(model, calib, samples=config.calibration_samples) \
            if isinstance(config, SmoothQuantConfig) else None
        quantize_(model.module, config, batches)
        compress_s = time.perf_counter() - start
        path = tmp / f"int8_{act.split()[0]}_{len(act)}.dsq"
        size = save(model, path)
        loaded = load(path)
        if act != "per_tensor":  # per-tensor eager runs on torch._int_mm: ~20x slower than fp32 on AVX2
            kernel = loaded.module.transformer.encoder.layer[0].attention.self.query.kernel(torch.device("cpu"))
            name = f"deepsqueeze int8 {act} (torch eager, {kernel})"
            rows[name] = {**fidelity(loaded.module), **invariance(loaded.module), "artifact_mb": _mb(size),
                          "ideal_mb": _ideal_mb(loaded.module), "compress_s": round(compress_s, 1)}
            runners[name] = lambda m=loaded.module: m(**tokens)
        start = time.perf_counter()
        exported = export(loaded, "onnx", tmp / f"int8_{len(rows)}.onnx", threads=ctx.threads)
        ort = OrtModule(exported.path, loaded.module, ctx.threads)
        name = f"deepsqueeze int8 {act} (our ONNX export, ORT)"
        rows[name] = {**fidelity(ort), **invariance(ort), "artifact_mb": _mb(size), "onnx_mb": _mb(exported.bytes),
                      "ideal_mb": _ideal_mb(loaded.module), "compress_s": round(compress_s + time.perf_counter() - start, 1)}
        runners[name] = lambda m=ort: m(**tokens)
        if act == "per_token":
            from deepsqueeze.export.pte import PteModule

            start = time.perf_counter()
            program = export(loaded, "pte", tmp / "int8_per_token.pte", threads=ctx.threads)
            pte = PteModule(program.path, loaded.module, ctx.threads)
            name = "deepsqueeze int8 per_token (our ExecuTorch export, XNNPACK)"
            rows[name] = {**fidelity(pte), **invariance(pte), "artifact_mb": _mb(size), "pte_mb": _mb(program.bytes),
                          "ideal_mb": _ideal_mb(loaded.module),
                          "compress_s": round(compress_s + time.perf_counter() - start, 1)}
            runners[name] = lambda m=pte: m(**tokens)

    ctx.log("minilm-int8: latency (interleaved)")
    repeat = 3 if ctx.quick else 5
    latency = measure_latency_interleaved(runners, warmup=2, repeat=repeat, threads=ctx.threads)
    out = []
    fastest_peer = min(latency["ORT quantize_dynamic per-channel"], latency["torch.ao dynamic"])
    for name, row in rows.items():
        ms = latency[name]
        row = {"model": name, **row, "latency_ms": round(ms, 1),
               "speedup_vs_fp32": round(latency["fp32 torch"] / ms, 2)}
        if name.startswith("deepsqueeze"):
            row["target"] = TARGET
            met = (row["cosine_mean"] >= 0.995 and row["cosine_min"] >= 0.99 and row["batch_invariance"] <= 1e-4
                   and ms * 1.15 <= fastest_peer
                   and row.get("onnx_mb", row.get("pte_mb", row["artifact_mb"])) <= 25)
            row["met"] = "yes" if met else "no"
        out.append(row)
    ctx.notes.append(f"latency batch: 32 sentences x {tokens['input_ids'].shape[1]} tokens; "
                     f"{len(sentences)} sentences scored")
    return out
