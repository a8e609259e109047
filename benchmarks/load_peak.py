"""Peak memory while loading a .dsq: MiniLM fp32, int8 and w4 artifacts against their loaded resident size."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks import _rss
from benchmarks.runner import BenchContext

NAME = "load-peak"
TITLE = "Peak RSS while loading MiniLM artifacts (fp32, int8, w4) against the loaded model's resident size"
SETUP = (
    "all-MiniLM-L6-v2 saved as an fp32 .dsq and compressed by the shipped recipes `recipes/int8-dynamic.yaml` "
    "and `recipes/w4-rtn.yaml`. Each artifact is loaded by `deepsqueeze.load` in a fresh process (imports and the "
    "tokenizer excluded): `load_mb` = RSS growth after load, `peak_load_mb` = the process's maximum RSS during "
    "load minus the RSS before it, `resident_mb` = RSS growth after one forward pass on 8 sentences. "
    "`peak_over_loaded` = peak_load_mb / load_mb; target <= 1.3. `file_mb` = the .dsq's bytes. Memory figures do "
    "not depend on machine load."
)
TARGET = 1.3
RECIPES = {"int8 (int8-dynamic)": "int8-dynamic.yaml", "w4 (w4-rtn)": "w4-rtn.yaml"}


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import save
    from deepsqueeze.core.timing import cpu_fingerprint
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.resolve import resolve_model

    ctx.notes.append(f"CPU: {cpu_fingerprint()}")
    recipes_dir = Path(__file__).resolve().parent.parent / "recipes"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "fp32.dsq"}
        save(resolve_model("minilm", progress=False), paths["fp32"])
        for name, recipe in RECIPES.items():
            ctx.log(f"load-peak: compressing with {recipe}")
            paths[name] = Path(tmp) / recipe.replace(".yaml", ".dsq")
            compress("minilm", load_recipe(str(recipes_dir / recipe)), paths[name], "pydoc-sentences:calib",
                     progress=False, evaluate_result=False)
        for name, path in paths.items():
            m = _rss.fresh("dsq", path)
            ratio = m["peak_load_mb"] / max(m["load_mb"], 1e-6)
            rows.append({"artifact": name, "file_mb": round(path.stat().st_size / 1e6, 2), **m,
                         "peak_over_loaded": round(ratio, 2), "target": f"peak <= {TARGET}x loaded",
                         "met": "yes" if ratio <= TARGET else "no"})
    return rows
