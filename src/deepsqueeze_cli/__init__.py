"""The ``deepsqueeze`` console script: checks that ``import deepsqueeze`` finds the package before running the CLI.

A folder named ``deepsqueeze`` without ``__init__.py`` (typically a git clone) in the current directory or on
``PYTHONPATH`` is imported as a namespace package ahead of an editable install, and the CLI would fail with a raw
``ModuleNotFoundError``; this launcher says which folder shadows the package and what to do, in one line.
"""

from __future__ import annotations

import sys


def shadowing_folder() -> str | None:
    """The folder that ``import deepsqueeze`` resolved to when it is not the package (None when all is well)."""
    import deepsqueeze

    if getattr(deepsqueeze, "__file__", None) is not None:
        return None
    return next(iter(getattr(deepsqueeze, "__path__", [])), "?")


class _Signal(KeyboardInterrupt):
    """SIGINT / SIGTERM while the CLI is still importing (``deepsqueeze.core.signals`` takes over after)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.exit_code = 128 + signum


_received: int | None = None  # a signal _early took, in case an import swallowed its KeyboardInterrupt


def _early(signum: int, frame: object) -> None:
    global _received
    _received = signum
    raise _Signal(signum)


def main() -> None:
    """Run ``deepsqueeze.cli.app.main``; exit 2 with one line on stderr when the package is shadowed, 130 / 143
    with ``interrupted`` / ``terminated`` on a signal that comes while the CLI is still importing."""
    import signal

    global _received
    _received = None
    signal.signal(signal.SIGTERM, _early)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _early)
    try:
        folder = shadowing_folder()
        if folder is not None:
            print(f"error: the folder {folder} (named deepsqueeze, without the package in it) shadows the installed "
                  "deepsqueeze package: run from another directory or remove its parent from PYTHONPATH",
                  file=sys.stderr)
            sys.exit(2)
        from deepsqueeze.cli.app import main as app_main

        if _received is not None:  # the import went on: a C extension's initialisation (torch importing NumPy)
            raise _Signal(_received)  # caught the KeyboardInterrupt and left a module half-imported: stop here
        try:
            app_main()
        finally:  # the command is over: a signal during the interpreter's exit must not print a traceback
            signal.signal(signal.SIGTERM, _late)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, _late)
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", 130)
        print("terminated" if code == 143 else "interrupted", file=sys.stderr)
        _exit_interrupted(code)
    except SystemExit as exc:
        if exc.code in (130, 143):
            _exit_interrupted(exc.code)
        raise


def _late(signum: int, frame: object) -> None:
    """SIGINT / SIGTERM after the command ended (while the interpreter joins threads and exits): say so and what
    the command had written, then exit 130 / 143."""
    from deepsqueeze.core.signals import interrupted_line

    print(interrupted_line(_Signal(signum)), file=sys.stderr)
    _exit_interrupted(128 + signum)


def _exit_interrupted(code: int) -> None:
    """End an interrupted command with ``code`` (130 / 143), its cleanup done, its streams flushed, through
    ``os._exit``: through the interpreter's own exit, about one SIGINT in seven 5.5 s into ``export --format hf``
    ended as killed by SIGINT (exit -2) after the CLI had caught it, cleaned up and printed ``interrupted`` (CPython
    ends a run whose KeyboardInterrupt it considers unhandled by re-raising SIGINT; which C path marked it so
    there was not pinned down). Nothing is left for the interpreter's exit to do: outputs are written atomically
    and temporaries removed by the ``finally`` blocks the interrupt went through."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
