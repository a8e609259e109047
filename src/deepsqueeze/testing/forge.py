"""Edit a .dsq as an attacker would: change its manifest and recompute every checksum and the digest.

Used by the security tests and the decoder fuzzer (``tests/fuzz/test_dsq.py``): a forged file passes
the integrity checks, so only the manifest schema and the decoders stand between it and the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsqueeze.codec.format import (
    _HEADER,
    _HEADER_V1,
    _PREFIX,
    DEFLATED_FROM,
    FORMAT_VERSION,
    MAGIC,
    store_manifest,
)


def split_artifact(data: bytes) -> tuple[int, bytes, bytes]:
    """(format version, manifest JSON bytes, payload) of a .dsq's bytes (any format; a deflated manifest is
    inflated, unbounded: forge only files you made)."""
    _, version = _PREFIX.unpack_from(data)
    header = _HEADER_V1 if version == 1 else _HEADER
    length = header.unpack_from(data)[2]
    start = header.size
    manifest = data[start : start + length]
    return version, zlib.decompress(manifest) if version >= DEFLATED_FROM else manifest, data[start + length :]


def assemble_artifact(manifest: dict[str, Any] | bytes, payload: bytes, version: int = FORMAT_VERSION,
                      stored: bool = False) -> bytes:
    """A .dsq whose header, manifest checksum and digest are consistent with ``manifest`` (a dict, or its JSON
    bytes; ``stored``: bytes already as the file keeps them, e.g. a forged deflate stream) and ``payload``."""
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True,
                                                                   separators=(",", ":")).encode()
    if not stored:
        body = store_manifest(body, version)
    if version == 1:
        return _HEADER_V1.pack(MAGIC, 1, len(body), zlib.crc32(body)) + body + payload
    digest = hashlib.sha256(body + payload).digest()
    return _HEADER.pack(MAGIC, version, len(body), zlib.crc32(body), digest) + body + payload


def reseal(data: bytes) -> bytes:
    """``data`` with its manifest CRC and digest recomputed (after raw edits of manifest or payload)."""
    version, manifest, payload = split_artifact(data)
    return assemble_artifact(manifest, payload, version)


def forge_manifest(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   edit: Callable[[dict[str, Any]], dict[str, Any] | None], version: int | None = None) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(manifest)`` applied (in place, or returning a new one).

    ``version`` rewrites the header's format version too (the manifest's ``version`` field follows).
    """
    file_version, manifest_bytes, payload = split_artifact(Path(src).read_bytes())
    manifest = json.loads(manifest_bytes)
    if version is not None:
        manifest["version"] = version
    edited = edit(manifest)
    out = Path(dst)
    out.write_bytes(assemble_artifact(edited if isinstance(edited, dict) else manifest, payload,
                                      file_version if version is None else version))
    return out
