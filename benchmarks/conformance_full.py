"""``conformance`` with every cell of the matrix end to end (``make conformance`` as benchmark rows; about two
hours on 2 cores)."""

from __future__ import annotations

from typing import Any

from benchmarks.conformance import COLUMNS, SETUP, matrix_rows
from benchmarks.runner import BenchContext

NAME = "conformance-full"
TITLE = "Conformance, every cell end to end: every command x shipped recipe x model kind"
__all__ = ["COLUMNS", "NAME", "SETUP", "TITLE", "run"]


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    return matrix_rows(ctx, full=True)
