"""The fuzzing campaign over every surface (``make fuzz``, ``deepsqueeze bench fuzz``).

    python -m tests.fuzz.campaign --cases 30000 --seed 1 [--surfaces dsq,hf] [--json out.json]

``--cases`` is split across the surfaces (the .dsq loader takes the largest share; the signal surface, whose
cases are whole CLI runs, a handful). Each surface runs in its own worker process, so a crash inside native
code is a finding (not the end of the campaign) and each surface's RSS growth is measured from its own warm-up.
A watchdog kills a worker that makes no progress for ``WATCHDOG_S`` (a hang the in-process SIGALRM could not
interrupt) and resumes after that case. One JSON summary per surface is printed, then the total; the exit code
is 1 when any surface misses the target (see ``oracle.target_met``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SURFACES = ("dsq", "hf", "study", "space", "signals")
SHARES = {"dsq": 81, "space": 8, "hf": 6, "study": 5}  # of the cases the signal surface leaves
SIGNAL_SHARE = 0.001  # one CLI run per thousand cases (at least 2)
WATCHDOG_S = 180.0
SUMMED = ("cases", "ok", "other", "hangs", "forward_failures", "canary_hits")


def split(cases: int, surfaces: tuple[str, ...] = SURFACES) -> dict[str, int]:
    """How many of ``cases`` each surface runs."""
    out: dict[str, int] = {}
    rest = cases
    if "signals" in surfaces:
        out["signals"] = max(2, round(cases * SIGNAL_SHARE))
        rest = max(0, cases - out["signals"])
    shares = {s: w for s, w in SHARES.items() if s in surfaces}
    total = sum(shares.values())
    for surface, weight in shares.items():
        out[surface] = rest * weight // total
    if shares:
        first = next(iter(shares))
        out[first] += rest - sum(out[s] for s in shares)
    return {s: out[s] for s in surfaces if s in out}


def _merge(parts: list[dict[str, Any]], surface: str) -> dict[str, Any]:
    merged: dict[str, Any] = {"surface": surface, "documented": {}, "kinds": {}, "seconds": {}, "failures": [],
                              "slowest_s": 0.0, "slowest_case": None, "peak_rss_growth_mb": 0.0}
    for key in SUMMED:
        merged[key] = sum(p.get(key, 0) for p in parts)
    for part in parts:
        for field in ("documented", "kinds", "seconds"):
            for k, v in part.get(field, {}).items():
                merged[field][k] = round(merged[field].get(k, 0) + v, 1)
        merged["failures"] += part.get("failures", [])
        if part.get("slowest_s", 0) >= merged["slowest_s"]:
            merged["slowest_s"], merged["slowest_case"] = part.get("slowest_s", 0), part.get("slowest_case")
        merged["peak_rss_growth_mb"] = max(merged["peak_rss_growth_mb"], part.get("peak_rss_growth_mb", 0))
        for key, value in part.items():  # surface extras (seed_bytes, command_wall_s)
            merged.setdefault(key, value)
    merged["documented_errors"] = sum(merged["documented"].values())
    return merged


def run_surface(surface: str, cases: int, seed: int, log: Any = None) -> dict[str, Any]:
    """Run ``cases`` cases of ``surface`` in worker processes (resumed after a hang or a crash)."""
    parts: list[dict[str, Any]] = []
    start, end = 0, cases
    started = time.perf_counter()
    while start < end:
        with tempfile.TemporaryDirectory(prefix=f"ds-fuzz-{surface}-") as tmp:
            progress, result = Path(tmp) / "progress", Path(tmp) / "result.json"
            checkpoint, errors = Path(tmp) / "checkpoint.json", Path(tmp) / "stderr.txt"
            env = {**os.environ, "DEEPSQUEEZE_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1",
                   "DEEPSQUEEZE_FUZZ_CHECKPOINT": str(checkpoint),
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
            argv = [sys.executable, "-m", "tests.fuzz.campaign", "--worker", surface, "--cases", str(end - start),
                    "--seed", str(seed), "--start", str(start), "--tmp", tmp, "--progress", str(progress),
                    "--json", str(result)]
            with open(errors, "w") as err:  # a file, not a pipe: a chatty worker never blocks on a full pipe
                proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
            last, last_change = -1, time.monotonic()
            stalled = False
            while proc.poll() is None:
                time.sleep(1.0)
                current = _read_progress(progress)
                if current != last:
                    last, last_change = current, time.monotonic()
                elif current >= 0 and time.monotonic() - last_change > WATCHDOG_S:
                    proc.kill()
                    stalled = True
            stderr = errors.read_text(errors="replace")
            if result.is_file():
                parts.append(json.loads(result.read_text()))
                start = end
                continue
            case = max(last, start)
            what = (f"hang: no progress for {WATCHDOG_S:.0f} s (watchdog)" if stalled else
                    f"worker died (exit {proc.returncode}): {' '.join(stderr.split())[-300:]}")
            if checkpoint.is_file():  # the counts up to the last checkpoint (cases after it are not counted)
                parts.append(json.loads(checkpoint.read_text()))
            parts.append({"cases": 1, "hangs": int(stalled), "other": int(not stalled),
                          "failures": [[case, "worker", what]]})
            if last < 0:  # died before its first case (setup): nothing to resume
                break
            start = case + 1
    merged = _merge(parts, surface)
    merged["wall_s"] = round(time.perf_counter() - started, 1)
    if log:
        log(json.dumps({k: v for k, v in merged.items() if k not in ("seconds", "rss_jumps")}, default=str))
    return merged


def _read_progress(path: Path) -> int:
    try:
        return int(path.read_text() or -1)
    except (OSError, ValueError):
        return -1


def run_all(cases: int, seed: int, surfaces: tuple[str, ...] = SURFACES, log: Any = None) -> dict[str, Any]:
    from tests.fuzz.oracle import target_met

    results = {}
    for surface, n in split(cases, surfaces).items():
        results[surface] = run_surface(surface, n, seed, log)
        results[surface]["met"] = target_met(results[surface])
    total = _merge([{k: v for k, v in r.items() if k in (*SUMMED, "documented", "failures", "slowest_s",
                                                          "slowest_case", "peak_rss_growth_mb")}
                    for r in results.values()], "total")
    total["met"] = all(r["met"] for r in results.values())
    total["wall_s"] = round(sum(r["wall_s"] for r in results.values()), 1)
    return {"surfaces": results, "total": total, "seed": seed, "requested": cases}


def _worker(args: argparse.Namespace) -> None:
    module = importlib.import_module(f"tests.fuzz.test_{args.worker}")
    progress = Path(args.progress)

    def tick(case: int) -> None:
        progress.write_text(str(case))

    work = Path(args.tmp) / "work"
    work.mkdir(parents=True, exist_ok=True)
    result = module.run_campaign(args.cases, args.seed, work, start=args.start, progress=tick)
    Path(args.json).write_text(json.dumps(result, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=int(os.environ.get("DEEPSQUEEZE_FUZZ_CASES", "30000")))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "1")))
    parser.add_argument("--surfaces", default=",".join(SURFACES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import warnings

        warnings.simplefilter("ignore")
        _worker(args)
        return 0
    surfaces = tuple(s for s in args.surfaces.split(",") if s)
    unknown = [s for s in surfaces if s not in SURFACES]
    if unknown:
        parser.error(f"unknown surface {unknown[0]!r}: choose from {', '.join(SURFACES)}")
    summary = run_all(args.cases, args.seed, surfaces, log=print)
    print(json.dumps({k: v for k, v in summary["total"].items() if k not in ("seconds", "kinds")}, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0 if summary["total"]["met"] else 1


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
