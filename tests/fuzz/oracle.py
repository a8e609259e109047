"""The oracle every fuzz surface shares (issue 25, the campaign part).

A case is one hostile input handed to one deepsqueeze entry point. What must hold for every case:

* it ends in a documented error (a ``DeepsqueezeError`` subclass the surface allows) or it succeeds, and a
  success is usable: a loaded model runs its forward pass to finite outputs (else a *forward failure*);
* nothing else escapes (a traceback: ``other``), no case takes ``HANG_S`` seconds (a *hang*; the surface's
  work is interrupted by SIGALRM, and the campaign driver's watchdog catches a hang inside native code);
* the process's peak RSS does not grow by ``RSS_LIMIT_MB`` over its warm-up peak; while a case runs its
  address space is capped (``VM_HEADROOM_MB`` over what it uses), so a blow-up is an allocation error,
  counted, instead of the machine's memory;
* nothing is imported or run from a file (*canary*): a module ``canary_mod`` on ``sys.path`` leaves a mark
  when imported, and an audit hook records any import of it, any open of the canary folder (a "secret"
  folder holding a model config and an artifact) and any process started, as ``tests/test_file_references.py``.

Each case draws its own random stream from ``(surface, seed, case)``, so any case reruns alone.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import textwrap
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepsqueeze.errors import ArtifactError, DataError, DeepsqueezeError, ModelError, RecipeError

HANG_S = 10.0  # no case may take this long
RSS_LIMIT_MB = 200.0  # peak RSS growth over the warm-up peak, at most
VM_HEADROOM_MB = 3072  # address space a case may add while it runs (a blow-up fails instead of swapping)
MAX_FAILURES = 20  # a campaign stops recording (and a surface stops) after this many
CHECKPOINT_EVERY = 25
DOCUMENTED: tuple[type[DeepsqueezeError], ...] = (ArtifactError, ModelError, RecipeError, DataError)

CANARY_MODULE = "canary_mod"
CANARY_CODE = textwrap.dedent("""
    import os, pathlib
    pathlib.Path(os.environ.get("DS_FUZZ_CANARY_MARK", "/nonexistent/mark")).write_text("imported")
    def build():
        pathlib.Path(os.environ.get("DS_FUZZ_CANARY_MARK", "/nonexistent/mark")).write_text("called")
        import torch
        return torch.nn.Linear(4, 4)
""")


class Hang(BaseException):
    """SIGALRM: the case ran past ``HANG_S`` (a BaseException, so no ``except Exception`` swallows it)."""


class ForwardFailure(BaseException):
    """A surface's check of a success failed (forward raised, non-finite outputs, a file rewritten...)."""


def case_rng(surface: str, seed: int, case: int) -> random.Random:
    """The random stream of one case (string seeds are hashed with SHA-512: stable across runs)."""
    return random.Random(f"{surface}:{seed}:{case}")


class Canary:
    """A canary module on ``sys.path``, a watched "secret" folder and an audit hook, armed only during cases."""

    _installed: Canary | None = None

    def __init__(self, root: Path) -> None:
        self.root = root
        self.code = root / "code"
        self.secret = root / "secret"
        self.mark = root / "mark"
        self.code.mkdir(parents=True, exist_ok=True)
        self.secret.mkdir(parents=True, exist_ok=True)
        (self.code / f"{CANARY_MODULE}.py").write_text(CANARY_CODE)
        (self.secret / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
        (self.secret / "tokenizer.json").write_text("{}")
        (self.secret / "other.dsq").write_bytes(b"\x89DSQ\r\n\x1a\n")
        os.environ["DS_FUZZ_CANARY_MARK"] = str(self.mark)
        if str(self.code) not in sys.path:
            sys.path.append(str(self.code))
        self.armed = False
        self.hits: list[str] = []
        self._watch = str(self.secret.resolve())
        if Canary._installed is None:  # an audit hook cannot be removed: one per process, retargeted
            sys.addaudithook(_hook)
        Canary._installed = self

    # strings a mutation plants where a file may name code, a folder or a file
    def references(self) -> list[str]:
        return [f"py:{CANARY_MODULE}:build", CANARY_MODULE, f"{CANARY_MODULE}.build", f"hf:{self.secret}",
                str(self.secret), str(self.secret / "other.dsq"), str(self.secret / "config.json"),
                str(self.secret / "tokenizer.json"), f"{CANARY_MODULE}:build", f"{CANARY_MODULE}.Thing"]

    def check(self) -> list[str]:
        found = list(self.hits)
        self.hits.clear()
        if self.mark.exists():
            found.append(f"canary mark: {self.mark.read_text()}")
            self.mark.unlink()
        sys.modules.pop(CANARY_MODULE, None)
        return found


def _hook(event: str, args: tuple[Any, ...]) -> None:
    canary = Canary._installed
    if canary is None or not canary.armed:
        return
    if event == "import" and args and str(args[0]).split(".")[0] == CANARY_MODULE:
        canary.hits.append(f"import {args[0]}")
    elif event == "open" and args and isinstance(args[0], (str, bytes)):
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(canary._watch):
            canary.hits.append(f"open {path}")
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork"):
        canary.hits.append(f"{event} {str(args)[:120]}")


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def bounded(seconds: float = HANG_S, headroom_mb: int | None = VM_HEADROOM_MB) -> Any:
    """SIGALRM after ``seconds``; the address space capped at its current size plus ``headroom_mb`` (None: not
    capped, for cases that start processes, which inherit the cap)."""
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_bytes() if headroom_mb is not None else 0
    if vm:
        cap = vm + (headroom_mb << 20)
        if old_limit[1] != resource.RLIM_INFINITY:
            cap = min(cap, old_limit[1])
        resource.setrlimit(resource.RLIMIT_AS, (cap, old_limit[1]))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, old_handler)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _where(exc: BaseException) -> str:
    """The innermost frame of ``exc``'s traceback inside deepsqueeze (else the innermost one)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "deepsqueeze" in f.filename and "/tests/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


class Campaign:
    """Counts for one surface; :meth:`case` runs one case under the oracle."""

    def __init__(self, surface: str, canary: Canary, allowed: tuple[type[BaseException], ...] = DOCUMENTED,
                 hang_s: float = HANG_S, headroom_mb: int | None = VM_HEADROOM_MB, arm: bool = True) -> None:
        self.surface = surface
        self.arm = arm  # False for a surface whose cases start processes themselves (the hook would see them)
        # the campaign driver's worker checkpoints its counts here, so a crash inside native code loses few cases
        self.checkpoint = os.environ.get("DEEPSQUEEZE_FUZZ_CHECKPOINT")
        self.canary = canary
        self.allowed = allowed
        self.hang_s = hang_s
        self.headroom_mb = headroom_mb
        self.base_rss = peak_rss_mb()
        self.stats: dict[str, Any] = {
            "surface": surface, "cases": 0, "ok": 0, "documented": Counter(), "other": 0, "hangs": 0,
            "forward_failures": 0, "canary_hits": 0, "slowest_s": 0.0, "slowest_case": None,
            "peak_rss_growth_mb": 0.0,
            "kinds": Counter(), "seconds": Counter(), "rss_jumps": [], "failures": [],
        }

    def warmed(self) -> None:
        """Call after the warm-up (imports, kernels, first loads): RSS growth is measured from here."""
        self.base_rss = peak_rss_mb()
        self.canary.check()

    @property
    def stop(self) -> bool:
        return len(self.stats["failures"]) >= MAX_FAILURES

    def _fail(self, case: int, kind: str, what: str) -> None:
        if len(self.stats["failures"]) < MAX_FAILURES:
            self.stats["failures"].append([case, kind, what[:400]])

    def case(self, case: int, kind: str, action: Callable[[], Any]) -> str:
        """Run ``action`` (the entry point, then the surface's check of a success); return the outcome."""
        stats = self.stats
        stats["cases"] += 1
        stats["kinds"][kind] += 1
        outcome = "ok"
        start = time.perf_counter()
        self.canary.armed = self.arm
        try:
            with bounded(self.hang_s, self.headroom_mb):
                action()
            stats["ok"] += 1
        except KeyboardInterrupt:
            raise
        except Hang:
            stats["hangs"] += 1
            outcome = "hang"
            self._fail(case, kind, f"hang: over {self.hang_s:.0f} s")
        except ForwardFailure as exc:
            stats["forward_failures"] += 1
            outcome = "forward"
            self._fail(case, kind, f"forward: {exc}")
        except self.allowed as exc:
            stats["documented"][type(exc).__name__] += 1
            outcome = "documented"
        except BaseException as exc:  # noqa: BLE001 - the finding is whatever escaped
            stats["other"] += 1
            outcome = "other"
            self._fail(case, kind, f"{type(exc).__name__} at {_where(exc)}: {' '.join(str(exc).split())[:240]}")
        finally:
            self.canary.armed = False
        elapsed = time.perf_counter() - start
        if elapsed > stats["slowest_s"]:
            stats["slowest_s"], stats["slowest_case"] = elapsed, [case, kind]
        stats["seconds"][kind] += elapsed
        hits = self.canary.check()
        if hits:
            stats["canary_hits"] += 1
            self._fail(case, kind, "canary: " + "; ".join(hits[:3]))
        growth = peak_rss_mb() - self.base_rss
        if growth > stats["peak_rss_growth_mb"] + 20:  # where the peak moved (to find what grows memory)
            stats["rss_jumps"] = [*stats["rss_jumps"][-4:], [case, kind, round(growth, 1)]]
        stats["peak_rss_growth_mb"] = max(stats["peak_rss_growth_mb"], growth)
        if growth > RSS_LIMIT_MB and not any("peak RSS" in f[2] for f in stats["failures"]):
            self._fail(case, kind, f"peak RSS grew by {growth:.0f} MB")
        if self.checkpoint and stats["cases"] % CHECKPOINT_EVERY == 0:
            Path(self.checkpoint).write_text(json.dumps(self.result(), default=str))
        return outcome

    def result(self) -> dict[str, Any]:
        out = dict(self.stats)
        out["documented"] = dict(sorted(out["documented"].items()))
        out["kinds"] = dict(sorted(out["kinds"].items()))
        out["seconds"] = {k: round(v, 1) for k, v in sorted(out["seconds"].items())}
        out["documented_errors"] = sum(out["documented"].values())
        out["slowest_s"] = round(out["slowest_s"], 3)
        out["peak_rss_growth_mb"] = round(out["peak_rss_growth_mb"], 1)
        return out


def target_met(result: dict[str, Any]) -> bool:
    """The issue's target for one surface's result."""
    return (not result["failures"] and result["other"] == 0 and result["hangs"] == 0
            and result["forward_failures"] == 0 and result["canary_hits"] == 0
            and result["peak_rss_growth_mb"] < RSS_LIMIT_MB)


# --- mutation helpers shared by the JSON-shaped surfaces --------------------------------------------------------

HUGE = [10**30, -(10**30), 2**63, 2**64 + 1, -1, 0, 10**9, 10**6, 2**31, 2**31 - 1, 1e308, -0.0, 1e-300]


def json_paths(value: Any, prefix: tuple = (), limit: int = 64) -> list[tuple]:
    """Every path into ``value`` (dict keys, list indices; at most ``limit`` items of each list)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k), limit)
    elif isinstance(value, list):
        for i, v in enumerate(value[:limit]):
            out += json_paths(v, (*prefix, i), limit)
    return out


def get_path(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def nested(rng: random.Random, depth: int | None = None) -> Any:
    value: Any = 1
    for _ in range(depth or rng.choice([5, 40, 70, 200])):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def random_value(rng: random.Random, strings: list[str]) -> Any:
    """A hostile JSON value: huge or negative numbers, wrong types, deep nesting, planted references."""
    pick = rng.randrange(13)
    if pick == 0:
        return rng.choice(HUGE)
    if pick == 1:
        return rng.randint(-3, 70)
    if pick == 2:
        return rng.choice(strings) if strings else "x"
    if pick == 3:
        return rng.choice(["", "\x00", "é" * 3, "../../etc/passwd", "os:abort", "sys:exit", "float16", "int8",
                           "uint16", "bool", "raw", "huffman", "codebook", "zoo", "py", "hf", "12", "1e999",
                           "NaN", "-1", "None", "true", "x" * 5000])
    if pick == 4:
        return None
    if pick == 5:
        return rng.choice([True, False])
    if pick == 6:
        return []
    if pick == 7:
        return {}
    if pick == 8:
        return nested(rng)
    if pick == 9:
        return [rng.randint(-2, 40) for _ in range(rng.randint(0, 5))]
    if pick == 10:
        return rng.uniform(-1e6, 1e6)
    if pick == 11:
        return rng.choice([0.5, 1.5, -0.5, 1e-9, 3.0, 2.0**53 + 1])
    return [rng.randint(0, 1 << 20), rng.randint(0, 4096), rng.randint(0, 2**32)]


def off_by_one(rng: random.Random, value: Any) -> Any:
    """``value`` nudged: ints by +-1 (in lists too), bools flipped to ints, lists lengthened or shortened."""
    if isinstance(value, bool):
        return int(value) if rng.random() < 0.5 else (not value)
    if isinstance(value, int):
        return value + rng.choice([1, -1, -value - 1 if value else 1, 2**32])
    if isinstance(value, float):
        return rng.choice([value + 1, value - 1, value * 1e30, -value])
    if isinstance(value, list) and value:
        out = list(value)
        op = rng.randrange(3)
        if op == 0:
            i = rng.randrange(len(out))
            out[i] = off_by_one(rng, out[i])
        elif op == 1:
            out.append(out[-1])
        else:
            out.pop()
        return out
    return value


def mutate_json(rng: random.Random, data: Any, strings: list[str], focus: Callable[[tuple], bool] | None = None,
                steps: int | None = None) -> Any:
    """One to three structural edits of JSON data in place (delete, nudge, duplicate, add keys, replace)."""
    for _ in range(steps or rng.choice([1, 1, 1, 2, 3])):
        paths = [p for p in json_paths(data) if p]
        if not paths:
            return random_value(rng, strings)
        if focus is not None and rng.random() < 0.6:
            paths = [p for p in paths if focus(p)] or paths
        path = rng.choice(paths)
        parent, key = get_path(data, path[:-1]), path[-1]
        current = parent[key]
        op = rng.randrange(7)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(current, (int, float, list)) and not isinstance(current, str):
            parent[key] = off_by_one(rng, current)
        elif op == 2 and isinstance(current, list) and current:
            if rng.random() < 0.5:
                current.append(current[rng.randrange(len(current))])
            else:
                current.pop(rng.randrange(len(current)))
        elif op == 3 and isinstance(current, dict):
            current[rng.choice(["extra", "kind", "cls", "type", "path", "name", "auto_map", "model", "__class__",
                                rng.choice(strings) if strings else "x"])] = random_value(rng, strings)
        elif op == 4 and isinstance(current, (int, float)) and not isinstance(current, bool):
            parent[key] = rng.choice([str(current), bool(current), float(current), [current], {"v": current}])
        else:
            parent[key] = random_value(rng, strings)
    return data


def mutate_text(rng: random.Random, text: bytes) -> bytes:
    """Raw damage to a text file: flips, insertions, deletions, truncation, planted tokens."""
    body = bytearray(text)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(body)) if body else 0
        if op == 0 and body:
            body[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            body[pos:pos] = rng.choice([b"9" * 30, b"[" * 5000, b"{", b"-", b'"', b"e99", b"\xff\xfe", b"NaN",
                                        b"Infinity", b"1" * 5000, b"\x00", b'"a":1,"a":2,'])
        elif op == 2:
            del body[pos : pos + rng.randint(1, 64)]
        elif op == 3:
            del body[rng.randint(0, len(body)) :]
        else:
            body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(body)
