"""Run the CLI in-process, as the console script does, for tests that check exit codes and output."""

from __future__ import annotations

import sys
from typing import Any

import pytest


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``deepsqueeze *argv`` through ``cli.app.main``: (exit code, stdout, stderr) captured by ``capsys``."""
    from deepsqueeze.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(list(argv))
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def foreground_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: the default disposition a foreground
    terminal process has. A shell starting the test run in the background (``cmd &``) ignores SIGINT, the
    child inherits that, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
