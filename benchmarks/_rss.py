"""Resident memory of a model in a fresh process (BENCHMARKS.md rule 9), shared by minilm-w4-run and load-peak.

``python -m benchmarks._rss dsq PATH`` (or ``ort PATH``, ``lm REF``, ``gguf PATH``) imports what loading needs,
records the RSS, loads the model (a .dsq sentence encoder through ``deepsqueeze.load``; an ONNX file into an
ONNX Runtime session, 2 threads; a causal LM by reference: a .dsq, ``zoo:smollm2-135m``; a GGUF file into
llama.cpp), records the RSS and the process's peak RSS (``ru_maxrss``), runs one forward pass (8 sentences;
a causal LM: 128 tokens) and records the RSS again; it prints one JSON object (MB = 1e6 bytes, growth over
the RSS after imports).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences.",
             "A module can contain executable statements as well as function definitions.",
             "The with statement is used to wrap the execution of a block.", "Short one.",
             "Exceptions are identified by class instances.", "Strings are immutable.",
             "The import statement initiates a search for the named module."]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def measure(kind: str, path: str) -> dict[str, Any]:
    """Run in a fresh process (:func:`fresh`): RSS growth after load and after one forward, peak during load."""
    import torch

    torch.set_num_threads(2)
    if kind == "lm":
        import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not model memory)

        from deepsqueeze.resolve import resolve_model

        base, peak0 = _rss_mb(), _peak_mb()
        model = resolve_model(path, progress=False).module
        loaded, peak = _rss_mb(), _peak_mb()
        with torch.inference_mode():
            model(input_ids=torch.arange(128)[None] + 100)
    elif kind == "gguf":
        from llama_cpp import Llama

        base, peak0 = _rss_mb(), _peak_mb()
        llm = Llama(model_path=path, n_ctx=256, n_batch=128, n_threads=2, verbose=False)
        loaded, peak = _rss_mb(), _peak_mb()
        llm.eval(list(range(100, 228)))
    elif kind == "dsq":
        import transformers.models.bert.modeling_bert  # noqa: F401  (import cost is not model memory)
        from transformers import AutoTokenizer

        from deepsqueeze.artifact import load
        from deepsqueeze.zoo.hf import minilm_dir

        AutoTokenizer.from_pretrained(minilm_dir())  # tokenizer files warm (not model memory)
        base, peak0 = _rss_mb(), _peak_mb()
        model = load(path).module
        loaded, peak = _rss_mb(), _peak_mb()
        with torch.inference_mode():
            model.encode(SENTENCES)
    else:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from deepsqueeze.zoo.hf import minilm_dir

        tok = AutoTokenizer.from_pretrained(minilm_dir())
        tokens = {k: v.numpy() for k, v in tok(SENTENCES, padding=True, return_tensors="pt").items()}
        base, peak0 = _rss_mb(), _peak_mb()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        loaded, peak = _rss_mb(), _peak_mb()
        names = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in tokens.items() if k in names})
    after = _rss_mb()
    return {"load_mb": round(loaded - base, 1), "resident_mb": round(after - base, 1),
            "peak_load_mb": round(max(peak - base, loaded - base), 1) if peak > peak0 else round(loaded - base, 1)}


def fresh(kind: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`measure` in a new Python process (so nothing earlier in this process is counted)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "benchmarks._rss", kind, str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
