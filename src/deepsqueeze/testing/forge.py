"""Edit a .dsq as an attacker would: change its manifest and recompute every checksum.

Used by the security tests and the decoder fuzzer (``tests/codec/test_fuzz.py``): a forged file passes
the integrity checks, so only the manifest schema and the decoders stand between it and the loader.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsqueeze.codec.format import _HEADER, MAGIC


def split_artifact(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(format version, manifest, payload) of a valid .dsq's bytes."""
    _, version, length, _ = _HEADER.unpack_from(data)
    start = _HEADER.size
    return version, json.loads(data[start : start + length]), data[start + length :]


def assemble_artifact(manifest: dict[str, Any] | bytes, payload: bytes, version: int | None = None) -> bytes:
    """A .dsq whose header and manifest checksums are consistent with ``manifest`` and ``payload``."""
    from deepsqueeze.codec.format import FORMAT_VERSION

    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True,
                                                                   separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION if version is None else version, len(body), zlib.crc32(body))
    return header + body + payload


def forge_manifest(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   edit: Callable[[dict[str, Any]], dict[str, Any] | None], version: int | None = None) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(manifest)`` applied (in place, or returning a new one)."""
    file_version, manifest, payload = split_artifact(Path(src).read_bytes())
    edited = edit(manifest)
    out = Path(dst)
    out.write_bytes(assemble_artifact(manifest if edited is None else edited, payload,
                                      file_version if version is None else version))
    return out


__all__ = ["assemble_artifact", "forge_manifest", "split_artifact"]
