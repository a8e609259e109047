"""MiniLM 4-bit weight-only at run time: resident memory and latency from packed codes, against peers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _rss
from benchmarks.runner import BenchContext

NAME = "minilm-w4-run"
TITLE = "MiniLM w4 (GPTQ) at run time: resident memory and latency, ours vs fp32 vs ONNX Runtime MatMulNBits"
SETUP = (
    "all-MiniLM-L6-v2 compressed by the shipped recipe `recipes/w4-gptq.yaml` (calibration: pydoc-sentences:calib) "
    "and loaded back from its .dsq; PackedIntLinear runs the kernel its race chose per shape and batch kind "
    "(int4pack `_weight_int4pack_mm_for_cpu`, int8pack, or a per-call transient dequant), never a cached float "
    "weight. Peers: the fp32 model (loaded from an fp32 .dsq) and ONNX Runtime's own 4-bit weight-only quantizer "
    "(`MatMulNBitsQuantizer`, block 64, asymmetric) on our fp32 ONNX export. Memory (`resident_mb`): RSS growth "
    "of a fresh process after loading and one forward pass on 8 sentences, imports excluded (rule 9). Latency: "
    "2 threads, 3 warm-up calls, median of 7 with p10/p90, all models interleaved, batch 1 sentence and 64 "
    "sentences of pydoc-sentences:eval. Fidelity: cosine to fp32 on pydoc-sentences:eval; `max_abs_vs_dsq`: "
    "largest difference between the packed kernels' embeddings and the same .dsq decoded to float (forced "
    "`dequant`). torchao's int4 weight-only is not a peer here: torchao is not installed in this environment."
)
TARGET_RSS, TARGET_LAT = 0.25, 0.8


def _ort_4bit(fp32_model: Any, path: Path) -> Path | None:
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        return None
    from deepsqueeze.export.onnx import write_onnx

    raw = path.with_suffix(".fp32.onnx")
    write_onnx(fp32_model, raw, fp32_model.module.tokenize(["an example sentence", "and another one"]))
    quant = MatMulNBitsQuantizer(onnx.load(str(raw)), bits=4, block_size=64, is_symmetric=False)
    quant.process()
    quant.model.save_model_to_file(str(path), False)
    return path


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return round(float(c.mean()), 4), round(float(c.min()), 4)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.timing import cpu_fingerprint
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval.latency import measure_latency_spread
    from deepsqueeze.export import export
    from deepsqueeze.export.onnx import OrtModule
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.runtime import PackedIntLinear, set_packed_kernel

    sentences = resolve_data("pydoc-sentences:eval").sentences
    if ctx.quick:
        sentences = sentences[:128]
    ctx.notes.append(f"CPU: {cpu_fingerprint()}")
    ctx.notes.append("latency measured on a shared, busy machine (other engineers' jobs): treat ratios as noisy")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, w4_path, ort_path = Path(tmp) / "fp32.dsq", Path(tmp) / "w4.dsq", Path(tmp) / "w4.onnx"
        base = resolve_model("minilm", progress=False)
        save(base, fp32_path)
        ctx.log("minilm-w4-run: compressing with recipes/w4-gptq.yaml")
        start = time.perf_counter()
        compress("minilm", load_recipe(ROOT_RECIPE), w4_path, "pydoc-sentences:calib", progress=False,
                 evaluate_result=False)
        compress_s = time.perf_counter() - start
        have_ort = _ort_4bit(base, ort_path) is not None
        ours_onnx = Path(tmp) / "ours.onnx"
        export(load(w4_path), "onnx", ours_onnx, threads=ctx.threads)
        ctx.log("minilm-w4-run: resident memory in fresh processes")
        mem = {"fp32": _rss.fresh("dsq", fp32_path), "ours w4-gptq": _rss.fresh("dsq", w4_path),
               "ours w4-gptq (our ONNX export, ORT)": _rss.fresh("ort", ours_onnx)}
        if have_ort:
            mem["ORT MatMulNBits 4-bit"] = _rss.fresh("ort", ort_path)
        fp32 = load(fp32_path).module
        ours = load(w4_path).module
        runners: dict[str, Any] = {"fp32": fp32, "ours w4-gptq": ours,
                                   "ours w4-gptq (our ONNX export, ORT)": OrtModule(ours_onnx, fp32, threads=ctx.threads)}
        if have_ort:
            runners["ORT MatMulNBits 4-bit"] = OrtModule(ort_path, fp32, threads=ctx.threads)
        with torch.inference_mode():
            ref = fp32.encode(sentences)
            emb = {n: m.encode(sentences) for n, m in runners.items()}
            set_packed_kernel("dequant")
            try:
                decoded = ours.encode(sentences)
            finally:
                set_packed_kernel(None)
        kernels: dict[str, int] = {}
        for m in ours.modules():
            if isinstance(m, PackedIntLinear):
                for kind, k in m.kernels().items():
                    kernels[f"{kind}:{k}"] = kernels.get(f"{kind}:{k}", 0) + 1
        ctx.notes.append("kernels chosen (batch kind:kernel: layers): " + ", ".join(f"{k}: {v}" for k, v in sorted(kernels.items())))
        lat = {}
        for batch in (1, 64):
            tokens = fp32.tokenize(sentences[:batch])
            spread = measure_latency_spread({n: (lambda m=m, t=tokens: m(**t)) for n, m in runners.items()},
                                            warmup=3, repeat=5 if ctx.quick else 7, threads=ctx.threads)
            lat[batch] = {n: (v.median, v.p10, v.p90) for n, v in spread.items()}
        fp32_rss = mem["fp32"]["resident_mb"]
        for name in runners:
            cos_mean, cos_min = _cos(emb[name], ref)
            row: dict[str, Any] = {"model": name, "resident_mb": mem[name]["resident_mb"],
                                   "load_mb": mem[name]["load_mb"],
                                   "rss_vs_fp32": round(mem[name]["resident_mb"] / fp32_rss, 3)}
            for batch in (1, 64):
                med, p10, p90 = lat[batch][name]
                row[f"b{batch}_ms"] = round(med, 1)
                row[f"b{batch}_p10_p90"] = f"{p10:.1f}-{p90:.1f}"
                row[f"b{batch}_vs_fp32"] = round(med / lat[batch]["fp32"][0], 2)
            row.update({"cosine_mean": cos_mean, "cosine_min": cos_min})
            if name.startswith("ours"):
                row["max_abs_vs_dsq"] = float((emb[name] - decoded).abs().max())
                row["artifact_mb"] = round((w4_path if name == "ours w4-gptq" else ours_onnx).stat().st_size / 1e6, 2)
                row["compress_s"] = round(compress_s, 1)
                met = row["rss_vs_fp32"] <= TARGET_RSS and row["b1_vs_fp32"] <= TARGET_LAT
                row["target"] = f"RSS <= {TARGET_RSS:.0%} of fp32; b1 latency <= {TARGET_LAT}x fp32; fidelity = .dsq"
                row["met"] = "yes" if met and row["max_abs_vs_dsq"] < 1e-4 else "no"
            rows.append(row)
        if not have_ort:
            ctx.notes.append("ONNX Runtime's MatMulNBitsQuantizer is unavailable (needs onnx_ir): no ORT row")
    return rows


ROOT_RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "w4-gptq.yaml")
