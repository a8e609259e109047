"""The one progress reporter every long step uses (training epochs, calibration, GPTQ layers, k-means,
benchmarks, demo jobs).

On a terminal: a transient rich bar naming the stage and its position in the recipe
(``stage 2/4 prune: epoch 3/8``), steps done, a detail (loss) and the time left. Elsewhere (CI logs,
``| tee``, notebooks): plain lines on stderr, one when the label changes (a new epoch, a new layer
group), one every 15 s of work in between (also while one long unit runs: a heartbeat thread repeats the
line with the time elapsed), and one at the end, so no long step is silent for more than 15 s::

    [deepsqueeze] stage 2/4 prune: epoch 3/8  120/800 steps (15%)  loss 0.3124  0:12 elapsed, ~1:05 left

The recipe driver opens a :func:`stage` scope; every :func:`track` inside it prefixes its label with the
stage position and inherits whether progress is shown (``compress --json`` shows none).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("deepsqueeze_stage", default=None)
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("deepsqueeze_progress", default=True)

LOG_PREFIX = "[deepsqueeze]"
#: When the last progress line was written (``time.perf_counter``) and its text: :func:`keep_talking` reads them.
_last_line: dict[str, Any] = {"at": time.perf_counter(), "text": ""}


def _emit(text: str) -> None:
    print(f"{LOG_PREFIX} {text}", file=_stream(), flush=True)
    _last_line.update(at=time.perf_counter(), text=text)


RENAMED_GAP_S = 2.0  # off a terminal a new part (epoch 7/37) gets its line only this long after the last one


def log_interval_s() -> float:
    """Seconds between two log lines of one step outside a terminal (``DEEPSQUEEZE_PROGRESS_INTERVAL``, 15)."""
    try:
        return max(0.05, float(os.environ.get("DEEPSQUEEZE_PROGRESS_INTERVAL", "15")))
    except ValueError:
        return 15.0


def _stream() -> TextIO:
    return sys.stderr


def is_terminal() -> bool:
    stream = _stream()
    return bool(getattr(stream, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def log(message: str, enabled: bool | None = None) -> None:
    """One line on stderr (a rich line on a terminal), when progress is enabled."""
    if not (_ENABLED.get() if enabled is None else enabled):
        return
    if is_terminal():
        from rich.console import Console

        Console(stderr=True).print(message, markup=False, highlight=False)
    else:
        _emit(message)


def current_stage() -> str | None:
    """``"stage 2/4 prune"`` inside a recipe stage, else None."""
    return _STAGE.get()


@contextmanager
def stage(index: int, total: int, name: str, enabled: bool = True, kind: str = "stage") -> Iterator[str]:
    """Scope for stage ``index`` (0-based) of ``total``: labels every :func:`track` inside; logs start and end.

    ``kind`` names what is counted (``"stage"`` of a recipe, ``"benchmark"`` of a bench run).
    """
    outer = _STAGE.get()
    label = f"{kind} {index + 1}/{total} {name}"
    label = f"{outer} > {label}" if outer and kind == "stage" and outer.startswith("benchmark") else label
    stage_token, enabled_token = _STAGE.set(label), _ENABLED.set(enabled)
    start = time.perf_counter()
    try:
        log(f"{label}: started", enabled)
        yield label
        log(f"{label}: done in {time.perf_counter() - start:.1f} s", enabled)
    finally:
        _STAGE.reset(stage_token)
        _ENABLED.reset(enabled_token)


class Tracker:
    """Progress of one step of ``total`` units; :meth:`advance` after each unit."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool) -> None:
        self.total, self.unit, self.enabled = max(int(total), 1), unit, enabled
        self.completed, self.detail = 0, ""
        self.start = self.last_log = time.perf_counter()
        self.what = what
        self._prefix = current_stage()  # read here: the heartbeat thread does not see the stage's context
        self._logged_label: str | None = None
        self._bar: Any = None
        self._task: Any = None
        self._stop: threading.Event | None = None
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        prefix = self._prefix
        return f"{prefix}: {self.what}" if prefix and self.what else (prefix or self.what)

    def set(self, what: str) -> None:
        """Rename the current part (``epoch 3/8``, ``layer encoder.0.attn``)."""
        self.what = what
        if self._bar is not None:
            self._bar.update(self._task, description=self.label)

    def advance(self, n: int = 1, detail: str = "") -> None:
        self.completed = min(self.completed + n, self.total)
        self.detail = detail or self.detail
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, detail=self.detail)
            return
        now = time.perf_counter()
        since = now - self.last_log
        if (self._logged_label is None
                or self.label != self._logged_label and since >= min(RENAMED_GAP_S, log_interval_s())
                or since >= log_interval_s() or self.completed == self.total):
            self._log_line(now)

    def _log_line(self, now: float) -> None:
        with self._lock:
            self._write_line(now)

    def _write_line(self, now: float) -> None:
        elapsed = now - self.start
        left = elapsed / self.completed * (self.total - self.completed) if self.completed else 0.0
        parts = [self.label, f"{self.completed}/{self.total} {self.unit} ({100 * self.completed / self.total:.0f}%)"]
        if self.detail:
            parts.append(self.detail)
        parts.append(f"{_clock(elapsed)} elapsed" + (f", ~{_clock(left)} left" if self.completed < self.total else ""))
        _emit("  ".join(parts))
        self.last_log, self._logged_label = now, self.label

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = log_interval_s()
        while not stop.wait(min(interval, 1.0)):
            now = time.perf_counter()
            if now - self.last_log >= interval and not stop.is_set():
                self._log_line(now)

    def _open(self) -> None:
        if not self.enabled:
            return
        if not is_terminal():
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True,
                             name="deepsqueeze-progress").start()
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn(self.unit), TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                             transient=True, console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=self.total, detail="")

    def _close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def keep_talking(what: str, enabled: bool | None = None) -> Iterator[None]:
    """Outside a terminal, guarantee a line at least every :func:`log_interval_s` while the block runs, across
    steps and between them (loading a model, a step with no tracker): when no progress line came for 40% of it,
    one says ``what`` is still working and what the last line was. On a terminal, and when progress is off,
    nothing."""
    if not (_ENABLED.get() if enabled is None else enabled) or is_terminal():
        yield
        return
    interval = log_interval_s()
    quiet = max(0.05, 0.4 * interval)  # well before the interval is up: at load 4 a wake-up came 7 s late
    stop, start = threading.Event(), time.perf_counter()

    def watch() -> None:
        while not stop.wait(min(1.0, quiet / 4)):
            now = time.perf_counter()
            if now - _last_line["at"] >= quiet and not stop.is_set():
                last = _last_line["text"].split("  ")[0]
                _emit(f"{what}: still working ({_clock(now - start)} elapsed)" + (f", after: {last}" if last else ""))

    thread = threading.Thread(target=watch, daemon=True, name="deepsqueeze-keep-talking")
    _last_line["at"] = start
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def track(what: str, total: int, unit: str = "steps", enabled: bool | None = None) -> Iterator[Tracker]:
    """Report ``total`` units of work named ``what`` (prefixed with the current stage); see the module doc.

    ``enabled=None`` follows the enclosing :func:`stage` (default: shown).
    """
    tracker = Tracker(what, total, unit, _ENABLED.get() if enabled is None else enabled)
    tracker._open()
    try:
        yield tracker
    finally:
        tracker._close()
