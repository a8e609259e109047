"""JSON read from files, bounded: size, nesting depth, integer digits and finite numbers checked.

Every JSON file deepsqueeze parses (a .dsq manifest, a Hugging Face ``config.json``, ``modules.json``, a
study's ``summary.json``, the kernel cache) goes through :func:`loads_bounded`, so a file nested 100,000
deep, a 5,000-digit integer or ``NaN`` is one ``ValueError`` (or the caller's error) instead of a
``RecursionError`` or the interpreter's digit-limit ``ValueError`` from deep inside a library.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

MAX_DEPTH = 64
MAX_INT_DIGITS = 30
MAX_JSON_BYTES = 64 << 20


def _parse_int(text: str, limit: int) -> int:
    if len(text.lstrip("-")) > limit:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a non-finite number {text[:30]}")
    return value


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not allowed")


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"nesting deeper than {limit}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def loads_bounded(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """Parse JSON ``data``; ``ValueError`` (one line) for deeper nesting, longer integers, NaN / Infinity,
    non-finite floats, or text that is not UTF-8 JSON."""
    try:
        value = json.loads(data, parse_int=lambda t: _parse_int(t, max_int_digits), parse_float=_parse_float,
                           parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"nesting deeper than {max_depth}") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    _check_depth(value, max_depth)
    return value


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES, **bounds: int) -> Any:
    """:func:`loads_bounded` of the file at ``path``, read up to ``max_bytes`` (``ValueError`` past it;
    ``OSError`` when it cannot be read)."""
    with open(Path(path), "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes:,} bytes")
    return loads_bounded(data, **bounds)
