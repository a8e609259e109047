"""One signal contract for every command: SIGINT and SIGTERM both unwind through the same cleanup.

:func:`install` (called by the CLI) makes SIGTERM raise :class:`Terminated`, a ``KeyboardInterrupt``, so
every ``finally`` and ``except KeyboardInterrupt`` that cleans up after Ctrl-C (temporary files, staging
folders, a search's running trial, its answer) runs for SIGTERM too; the CLI then exits 130 or 143.
:func:`deferred_signals` holds a signal back while a temporary is created and recorded, so it is raised
only once the code that removes it is in charge (create temporaries inside ``try``, within this block).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's ``KeyboardInterrupt`` would be."""

    exit_code = 143


_depth = 0
_pending: int | None = None
#: The last SIGINT / SIGTERM this process got (see :func:`received_interrupt`).
_received: int | None = None
#: The files this command has put in place, complete (see :func:`published`).
_published: list[str] = []


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending, _received
    _received = signum
    if _depth > 0:
        _pending = signum
        return
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        # inside the import machinery (a module lock's weakref callback ignores and prints what it raises):
        # deliver the signal again a moment later, outside it
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise _interrupt(signum)


def install() -> None:
    """Route SIGTERM (and SIGINT, unless the process was started ignoring it) through :func:`_handler`; a command
    starts with no signal received."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        return
    _received = None
    _published.clear()
    signal.signal(signal.SIGTERM, _handler)
    current = signal.getsignal(signal.SIGINT)  # Python's own, or the console script's while it imported the CLI
    if current is signal.default_int_handler or getattr(current, "__module__", None) == "deepsqueeze_cli":
        signal.signal(signal.SIGINT, _handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back inside the block; one that came meanwhile is raised as the block ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise _interrupt(signum)


def received_interrupt() -> KeyboardInterrupt | None:
    """The interrupt of a SIGINT / SIGTERM this process received, or None. A command that ends in an error after
    one got a signal whose ``KeyboardInterrupt`` a library swallowed (torch's C initialisation catches one raised
    while it imports NumPy, leaving NumPy half-imported and a later import failing): the command ends as
    interrupted (130 / 143), never with that later, misleading error."""
    return None if _received is None else _interrupt(_received)


def published(path: str | os.PathLike[str]) -> None:
    """Record that ``path`` is in place, complete: a signal after this point cannot take it back, so the
    command's last line says it was written (see :func:`interrupted_line`)."""
    _published.append(os.fspath(path))


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """``interrupted`` / ``terminated``, naming the files already put in place, complete, before the signal."""
    word = "terminated" if exit_code(exc) == 143 else "interrupted"
    if not _published:
        return word
    names = ", ".join(_published[-3:]) + (f" and {len(_published) - 3} more" if len(_published) > 3 else "")
    return f"{word} after writing {names} in full"


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (128 + the signal number, as shells report them)."""
    return getattr(exc, "exit_code", 130)
