"""A decoder whose fp32 weights do not fit in half the machine's memory, quantized by `compress --stream`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "big-model-stream"
TITLE = "Streaming weight-only quantization of a decoder larger than half the RAM"
SETUP = (
    "A Llama-style decoder (grouped-query attention, 8 KV heads of 24, hidden 3072, FFN 8192, byte vocabulary) with "
    "seeded random weights, written by the benchmark as bf16 safetensors shards of 1 GiB with an index, as "
    "`save_pretrained` writes a large model; its fp32 weights exceed half of this machine's memory. "
    "`deepsqueeze compress --stream --recipe w4-rtn`-equivalent (RTN 4-bit, group 128, 8 calibration sentences from "
    "`pydoc-sentences:calib`, each quantized block run on them) in a fresh process: `peak_rss_gb` is that process's "
    "ru_maxrss, `fp32_gb` 4 bytes x parameters, `artifact_gb` the .dsq on disk. In-memory compression of the same "
    "model needs at least its fp32 size (no peer run: it does not fit). `--quick`: 4 layers."
)
TARGET = "peak RSS < 25% of the model's fp32 bytes and < half of RAM"

CHILD = """
import json, resource, sys, time
from deepsqueeze.recipes import load_recipe
from deepsqueeze.recipes.stream import compress_streaming
start = time.perf_counter()
result = compress_streaming(sys.argv[1], load_recipe(sys.argv[2]), sys.argv[3], "pydoc-sentences:calib", progress=False)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": time.perf_counter() - start,
                  "params": result.model.base_params, "bytes": result.artifact_bytes}))
"""


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.testing.big_models import llama_config, write_random_llama

    layers = 4 if ctx.quick else 32
    config = llama_config(hidden=3072, layers=layers, intermediate=8192, heads=24, kv_heads=8)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with tempfile.TemporaryDirectory(dir=os.environ.get("DEEPSQUEEZE_BENCH_TMP")) as tmp:
        folder = Path(tmp) / "llama"
        ctx.log(f"writing a {layers}-layer random checkpoint to {folder}")
        start = time.perf_counter()
        params = write_random_llama(folder, config, shard_bytes=1 << 30)
        write_s = time.perf_counter() - start
        checkpoint_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        recipe = Path(tmp) / "w4.yaml"
        recipe.write_text(json.dumps({"stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 128,
                                                  "calibration_samples": 8}]}))
        ctx.log("compressing block by block in a fresh process")
        child = subprocess.run([sys.executable, "-c", CHILD, f"hf:{folder}", str(recipe), str(Path(tmp) / "w4.dsq")],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"streamed compression failed: {child.stderr.strip()[-500:]}")
        out = json.loads(child.stdout.strip().splitlines()[-1])
    peak = out["peak_kb"] * 1024
    fp32 = 4 * params
    met = peak < 0.25 * fp32 and peak < ram / 2
    return [{
        "model": f"llama {layers} layers, hidden 3072, GQA 24/8", "params": params, "fp32_gb": round(fp32 / 1e9, 2),
        "fp32_vs_half_ram": round(fp32 / (ram / 2), 2), "checkpoint_gb_bf16": round(checkpoint_bytes / 1e9, 2),
        "peak_rss_gb": round(peak / 1e9, 2), "peak_vs_fp32": round(peak / fp32, 3),
        "artifact_gb": round(out["bytes"] / 1e9, 3), "ideal_gb_4bit": round(params * 0.5 / 1e9, 3),
        "compress_s": round(out["seconds"], 1), "write_checkpoint_s": round(write_s, 1),
        "target": TARGET, "met": "yes" if met else "no",
    }]
