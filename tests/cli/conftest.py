"""The installed console script, for tests that must go through the real entry point in a subprocess."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def console_script() -> list[str]:
    """argv prefix running ``deepsqueeze``: the script beside this interpreter, else the one on PATH."""
    script = Path(sys.executable).with_name("deepsqueeze")
    if script.exists():
        return [str(script)]
    found = shutil.which("deepsqueeze")
    return [found] if found else [sys.executable, "-m", "deepsqueeze"]
