"""Discovers benchmark modules, runs them, stores JSON results and regenerates BENCHMARKS.md.

A benchmark module in this package defines::

    NAME = "minilm-int8"                      # what `deepsqueeze bench NAME` runs
    TITLE = "MiniLM int8: ours vs peers"      # section heading in BENCHMARKS.md
    SETUP = "batch 64 x 128 tokens, ..."       # one paragraph: data, batch, epochs, peers
    def run(ctx: BenchContext) -> list[dict]  # one dict per table row

Rows are flat dicts of plain values; a row with a target carries ``target`` (text) and ``met``
("yes"/"no"). The runner adds the commit, torch version, thread count and date to every result.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import pkgutil
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


@dataclass
class BenchContext:
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    quick: bool = False
    notes: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        from deepsqueeze.core.progress import current_stage, log

        prefix = current_stage()
        log(f"{prefix}: {message}" if prefix else message)


def discover() -> dict[str, ModuleType]:
    """Benchmark name -> module, for every module in this package that defines NAME and run."""
    found = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in ("runner", "common") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_label() -> str:
    """``COMMIT DATE`` of this run, for rows that may later be kept beside another run's."""
    return f"{git_commit()} {_dt.date.today().isoformat()}"


def kept_rows(ctx: BenchContext, name: str, keep: Callable[[dict[str, Any]], bool],
              terms: Callable[[list[dict[str, Any]]], list[str]]) -> list[dict[str, Any]]:
    """Rows of benchmark ``name``'s stored result for which ``keep(row)`` holds, each naming the run that
    measured it. ``terms(kept)`` names what was kept (e.g. the models): a note says so, and the stored notes
    mentioning one of those terms come along."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    label = f"{old.get('commit', 'unknown')} {old.get('date', '')}".strip()
    kept = [{**row, "run": row.get("run", label)} for row in old.get("rows", []) if keep(row)]
    if kept:
        names = terms(kept)
        ctx.notes.append(f"rows of {', '.join(names)} kept from an earlier run (see each row's `run`; that run's "
                         f"wall time {old.get('wall_s')} s, {old.get('threads')} threads)")
        ctx.notes += [n for n in old.get("notes", []) if any(t in n for t in names) and n not in ctx.notes]
    return kept


def run_benchmark(module: ModuleType, ctx: BenchContext) -> dict[str, Any]:
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    from deepsqueeze.eval.latency import measured_since, measurement_count

    start, mark = time.perf_counter(), measurement_count()
    rows = module.run(ctx)
    timings = measured_since(mark)  # every latency the benchmark measured: were they trustworthy?
    result = {
        "name": module.NAME,
        "title": getattr(module, "TITLE", module.NAME),
        "setup": getattr(module, "SETUP", ""),
        "rows": rows,
        "notes": ctx.notes,
        "commit": git_commit(),
        "torch": torch.__version__,
        "threads": ctx.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cpu": _cpu(),
        "date": _dt.date.today().isoformat(),
        "wall_s": round(time.perf_counter() - start, 1),
        "quick": ctx.quick,
        "latency_reliable": all(t.reliable for t in timings) if timings else None,
        "latency_notes": _latency_notes(timings),
    }
    if not ctx.quick:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{module.NAME}.json").write_text(json.dumps(result, indent=2, default=_plain) + "\n")
        write_markdown()
    return result


def _latency_notes(timings: list[Any]) -> list[str]:
    """Why a benchmark's timings are not trustworthy: the machine's load, and how many were too spread out."""
    notes = [part for t in timings if t.note for part in t.note.split("; ") if not part.startswith("wide spread")]
    spread = sum("wide spread" in (t.note or "") for t in timings)
    if spread:
        notes.append(f"{spread} of {len(timings)} timed callables had a p10-p90 spread above 25% of the median")
    return list(dict.fromkeys(notes))


def _cpu() -> str:
    """CPU model and the flags that decide which kernels are fast (BENCHMARKS.md rule 10)."""
    from deepsqueeze.core.timing import cpu_fingerprint

    return cpu_fingerprint()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def write_markdown() -> None:
    """Regenerate BENCHMARKS.md from every stored result."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))]
    lines = [
        "# deepsqueeze benchmarks",
        "",
        "Generated by `deepsqueeze bench` from `benchmarks/`; do not edit by hand. Every row comes from the",
        "run stated under its table (commit, torch version, threads, date). Sizes are measured file bytes;",
        "`fp32_bytes` is 4 bytes per parameter of the uncompressed model; speedups are ratios of medians",
        "measured side by side in the same run.",
        "",
    ]
    for res in results:
        lines += [f"## {res['name']}: {res['title']}", ""]
        if res.get("setup"):
            lines += [res["setup"], ""]
        lines += _table(res["rows"]) + [""]
        for note in res.get("notes", []):
            lines.append(f"- {note}")
        if res.get("latency_reliable") is False:
            lines.append("- Latency caveat: " + "; ".join(dict.fromkeys(res.get("latency_notes", []))) +
                         ": treat this run's latencies and speedups as unreliable.")
        lines += [
            f"_Run: commit {res['commit']}, torch {res['torch']}, {res['threads']} threads, {res['date']}, "
            f"{res['wall_s']} s wall{'; CPU ' + res['cpu'] if res.get('cpu') else ''}._",
            "",
        ]
    BENCHMARKS_MD.write_text("\n".join(lines))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        if abs(value) < 0.1:  # four significant digits (a hypervolume of 0.01834 against 0.01831)
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")
