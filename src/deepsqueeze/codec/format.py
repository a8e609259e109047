"""The .dsq container: ``magic | version | manifest length | manifest crc | digest | JSON manifest | segments``.

Layout (little-endian), format version 4::

    8 bytes   magic  b"\\x89DSQ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode and 7-bit mangling)
    u32       format version
    u64       stored manifest length in bytes
    u32       CRC-32 of the stored manifest
    32 bytes  SHA-256 of everything after the header (manifest and segments)
    ...       manifest: UTF-8 JSON, keys sorted (same inputs -> same bytes), deflated (zlib, level 9)
    ...       segments, concatenated; each tensor entry lists (offset, length, crc32) of its own

Format 4 added 2-byte floats for float32 values they hold exactly (the ``narrow-float`` encoding, codebooks'
``cb``), which a format 3 reader would misread: it is told the file is newer instead. Format 3, format 2 (the
manifest stored as plain JSON) and format 1 (no digest field either; its per-segment CRCs still
verify it) still load. Version 0 and versions newer than this reader are refused. The manifest is deflated
because on small models it was half the file (a 43K-parameter CNN after Deep Compression: 14 KB of JSON
beside 14 KB of tensors); inflating it is bounded like the plain one.

The manifest is untrusted input: it is parsed with bounded depth and integer size, and every tensor
entry is checked by :class:`TensorSpec` (names, dtype, bounded shape, segments inside the payload and
not overlapping) before any decoder runs; decoders check the declared output against their payload
before allocating. No pickle anywhere: tensors are encoded by registered encodings into plain bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic
import torch

from deepsqueeze.core.encoding import get_encoding
from deepsqueeze.core.files import atomic_write, check_writable
from deepsqueeze.core.jsonfile import loads_bounded
from deepsqueeze.errors import ArtifactError

MAGIC = b"\x89DSQ\r\n\x1a\n"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
DEFLATED_FROM = 3  # the first format version whose manifest is stored deflated
_PREFIX = struct.Struct("<8sI")
_HEADER_V1 = struct.Struct("<8sIQI")
_HEADER = struct.Struct("<8sIQI32s")

# Bounds on what a manifest may declare (far above any real model, far below what would exhaust memory).
MAX_MANIFEST_BYTES = 256 << 20
#: A manifest may be at most this many times its payload (or MIN_MANIFEST_BOUND): real ones stay under 1x,
#: so a small file cannot make the loader parse and validate hundreds of MB of JSON.
MANIFEST_RATIO = 64
MIN_MANIFEST_BOUND = 4 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 24
MAX_TENSORS = 1_000_000
MAX_RANK = 8
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 36
MAX_SEGMENTS = 16
MAX_NAME = 1024
# A tensor may declare at most MAX_EXPANSION elements per stored byte (or MIN_DECLARED): a constant or
# 99.99%-sparse tensor stays loadable, a [10**9, 2] claim in a few hundred bytes fails before decoding.
MAX_EXPANSION = 1 << 16
MIN_DECLARED = 1 << 20

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}

StrictInt = Annotated[int, pydantic.Strict()]
Name = Annotated[str, pydantic.Strict(), pydantic.Field(max_length=MAX_NAME)]
Offset = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=1 << 62)]
Crc = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=0xFFFFFFFF)]
Dim = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=MAX_DIM)]
DtypeName = Annotated[str, pydantic.Strict(), pydantic.Field(pattern="^(" + "|".join(_DTYPES) + ")$")]


class TensorSpec(pydantic.BaseModel):
    """One manifest tensor entry: what the container promises before any byte is decoded."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    name: Name
    dtype: DtypeName
    shape: Annotated[list[Dim], pydantic.Field(max_length=MAX_RANK)]
    encoding: Annotated[str, pydantic.Strict(), pydantic.Field(max_length=64)]
    meta: dict[Name, Any]
    segments: Annotated[list[tuple[Offset, Offset, Crc]], pydantic.Field(max_length=MAX_SEGMENTS)]
    params: dict[Name, Any] | None = None

    @pydantic.field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_NUMEL:
            raise ValueError(f"{math.prod(shape)} elements exceed {MAX_NUMEL}")
        return shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


_TENSORS = pydantic.TypeAdapter(Annotated[list[TensorSpec], pydantic.Field(max_length=MAX_TENSORS)])


@dataclass
class TensorEntry:
    """One tensor to store: its state-dict name, value, and the encoding to use."""

    name: str
    tensor: torch.Tensor
    encoding: str = "raw"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ArtifactContents:
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    file_bytes: int


@dataclass
class Container:
    """A verified container: header checked, digest and manifest CRC matched, tensor entries validated."""

    path: str
    version: int
    manifest: dict[str, Any]
    entries: list[TensorSpec]
    payload: bytes
    file_bytes: int


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ArtifactError(f"cannot store tensors of dtype {name}: supported dtypes are {', '.join(_DTYPES)}")
    return name


def describe_error(exc: pydantic.ValidationError, prefix: str) -> str:
    """``field tensors.3.shape.0: Input should be ...`` for the first error, on one line."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    return f"field {where}: {' '.join(str(err['msg']).split())[:200]}"


class ArtifactWriter:
    """Write a .dsq incrementally: each tensor is encoded as it comes and its segments are spooled to an
    unnamed temporary file beside the target, so memory holds one tensor at a time, not the model.

    ``finish(manifest)`` writes header, manifest and the spooled segments atomically to the target and
    returns the file's size; leaving the ``with`` block on an error writes nothing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        check_writable(self.path)
        self._spool = tempfile.TemporaryFile(dir=self.path.parent)
        self._entries: list[dict[str, Any]] = []
        self._offset = 0

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._spool.close()

    def add(self, item: TensorEntry) -> None:
        """Encode ``item`` and spool its segments."""
        encoding = get_encoding(item.encoding)
        tensor = item.tensor.detach().cpu()
        meta, segments = encoding.encode(tensor, **item.params)
        seg_index = []
        for seg in segments:
            seg_index.append([self._offset, len(seg), zlib.crc32(seg)])
            self._spool.write(seg)
            self._offset += len(seg)
        entry = {
            "name": item.name,
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "encoding": item.encoding,
            "meta": meta,
            "segments": seg_index,
        }
        if item.params:  # what was asked for, so a loaded model saves again the same way
            entry["params"] = item.params
        self._entries.append(entry)

    def finish(self, manifest: dict[str, Any]) -> int:
        """Write the container (``manifest`` plus the tensor entries) atomically; return its size in bytes."""
        full_manifest = {**manifest, "format": "deepsqueeze", "version": FORMAT_VERSION, "tensors": self._entries}
        manifest_bytes = store_manifest(json.dumps(full_manifest, sort_keys=True, separators=(",", ":"),
                                                  allow_nan=False).encode(), FORMAT_VERSION)
        crc = zlib.crc32(manifest_bytes)

        def write(fh: Any) -> None:
            digest = hashlib.sha256(manifest_bytes)
            fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), crc, bytes(32)) + manifest_bytes)
            self._spool.seek(0)
            while chunk := self._spool.read(1 << 22):
                digest.update(chunk)
                fh.write(chunk)
            fh.seek(0)  # the digest of what follows the header goes into the header
            fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), crc, digest.digest()))

        atomic_write(self.path, write)
        return _HEADER.size + len(manifest_bytes) + self._offset


def is_artifact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like a .dsq (what ``compress --out`` may replace)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def write_artifact(path: str | os.PathLike[str], manifest: dict[str, Any], tensors: list[TensorEntry]) -> int:
    """Encode ``tensors``, write the container atomically to ``path``, return its size in bytes."""
    with ArtifactWriter(path) as writer:
        for item in tensors:
            writer.add(item)
        return writer.finish(manifest)


def store_manifest(manifest_json: bytes, version: int) -> bytes:
    """The manifest's bytes as format ``version`` stores them (deflated from :data:`DEFLATED_FROM` on)."""
    return zlib.compress(manifest_json, 9) if version >= DEFLATED_FROM else manifest_json


def inflate_manifest(stored: bytes, limit: int) -> bytes:
    """The JSON of a deflated manifest, at most ``limit`` bytes; ``OverflowError`` for a stream that inflates
    past ``limit`` (a decompression bomb stops there), ``ValueError`` for one that is not one complete zlib
    stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(stored, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"the stored manifest does not inflate ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise OverflowError(f"the manifest inflates past {limit:,} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("the stored manifest is not one complete zlib stream")
    return out


def parse_manifest(manifest_bytes: bytes) -> dict[str, Any]:
    """JSON with bounded depth, bounded integers and finite numbers; ``ValueError`` otherwise."""
    manifest = loads_bounded(manifest_bytes, max_depth=MAX_DEPTH, max_int_digits=MAX_INT_DIGITS)
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    return manifest


def read_container(path: str | os.PathLike[str]) -> Container:
    """Read and verify header, digest and manifest, and validate every tensor entry against the payload."""
    path = Path(path)
    try:
        data = _map(path)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder, not a .dsq artifact") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror}") from None
    if len(data) < _PREFIX.size or bytes(data[: len(MAGIC)]) != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise ArtifactError(f"{path} is truncated ({len(data)} bytes): re-create it with deepsqueeze compress")
        raise ArtifactError(f"{path} is not a deepsqueeze artifact (bad magic bytes)")
    _, version = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} uses .dsq format version {version}, newer than this deepsqueeze reads ({FORMAT_VERSION}): "
            "upgrade deepsqueeze"
        )
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has an invalid .dsq format version {version}: the header is corrupted")
    header = _HEADER if version >= 2 else _HEADER_V1
    if len(data) < header.size:
        raise ArtifactError(f"{path} is truncated ({len(data)} bytes): re-create it with deepsqueeze compress")
    fields = header.unpack_from(data)
    manifest_len, manifest_crc = fields[2], fields[3]
    start = header.size
    if manifest_len > len(data) - start:
        raise ArtifactError(f"{path} is truncated: the manifest runs past the end of the file; re-create it")
    if manifest_len > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} has a {manifest_len}-byte manifest (at most {MAX_MANIFEST_BYTES}): not loaded")
    payload_len = len(data) - start - manifest_len
    if manifest_len > max(MIN_MANIFEST_BOUND, MANIFEST_RATIO * payload_len):
        raise ArtifactError(f"{path} has a {manifest_len:,}-byte manifest for {payload_len:,} bytes of tensors: "
                            "out of proportion, the file is forged or corrupted; not loaded")
    if version >= 2 and hashlib.sha256(memoryview(data)[start:]).digest() != fields[4]:
        raise ArtifactError(f"{path} is corrupted: SHA-256 digest mismatch; re-create it")
    manifest_bytes = bytes(data[start : start + manifest_len])
    if zlib.crc32(manifest_bytes) != manifest_crc:
        raise ArtifactError(f"{path} is corrupted: manifest checksum mismatch; re-create it")
    try:
        if version >= DEFLATED_FROM:
            manifest_bytes = inflate_manifest(manifest_bytes, min(MAX_MANIFEST_BYTES, max(
                MIN_MANIFEST_BOUND, MANIFEST_RATIO * payload_len)))
        manifest = parse_manifest(manifest_bytes)
    except OverflowError:
        raise ArtifactError(f"{path} has a manifest that inflates past its bound for {payload_len:,} bytes of "
                            "tensors: out of proportion, the file is forged or corrupted; not loaded") from None
    except (ValueError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} has a malformed manifest: {' '.join(str(exc).split())[:200]}") from None
    payload = data[start + manifest_len :]
    try:
        entries = _TENSORS.validate_python(manifest.get("tensors"))
    except pydantic.ValidationError as exc:
        raise ArtifactError(f"{path} has a malformed manifest: {describe_error(exc, 'tensors')}") from None
    _check_layout(path, entries, len(payload))
    return Container(str(path), version, manifest, entries, payload, len(data))


def _check_layout(path: Path, entries: list[TensorSpec], payload_len: int) -> None:
    """Unique names; every segment inside the payload; no two segments overlapping."""
    seen: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for entry in entries:
        if entry.name in seen:
            raise ArtifactError(f"{path} has a malformed manifest: tensor {entry.name[:80]!r} appears twice")
        seen.add(entry.name)
        for offset, length, _ in entry.segments:
            if offset + length > payload_len:
                raise ArtifactError(f"{path} is truncated: tensor {entry.name[:80]!r} runs past the end of the file")
            if length:
                spans.append((offset, offset + length, entry.name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ArtifactError(f"{path} has a malformed manifest: segments of tensors {first[:80]!r} and "
                                f"{second[:80]!r} overlap")


def decode_entry(container: Container, entry: TensorSpec) -> torch.Tensor:
    """Verify the CRCs of ``entry``'s segments and decode it; every failure is an ``ArtifactError``."""
    segments = []
    for offset, length, crc in entry.segments:
        seg = container.payload[offset : offset + length]
        if zlib.crc32(seg) != crc:
            raise ArtifactError(f"{container.path} is corrupted: checksum mismatch in tensor {entry.name[:80]!r}")
        segments.append(bytes(seg))
        _release(container.payload, offset, length)
    encoding = get_encoding(entry.encoding)
    shape = tuple(entry.shape)
    stored = sum(length for _, length, _ in entry.segments)
    if entry.numel > max(MIN_DECLARED, MAX_EXPANSION * stored):
        raise ArtifactError(f"{container.path}: tensor {entry.name[:80]!r} declares {entry.numel:,} elements from "
                            f"{stored:,} bytes: field tensors.shape is out of proportion (forged or corrupted)")
    problem = encoding.check_params(entry.params or {})
    if problem:
        raise ArtifactError(f"{container.path} has a malformed manifest: tensor {entry.name[:80]!r} "
                            f"({entry.encoding}): {problem}")
    try:
        tensor = encoding.decode(entry.meta, segments, shape, entry.torch_dtype)
    except ArtifactError as exc:
        raise ArtifactError(f"{container.path}: cannot decode tensor {entry.name[:80]!r} ({entry.encoding}): "
                            f"{exc}") from None
    except (TypeError, KeyError, ValueError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
        # a decoder meeting a meta field of the wrong JSON type: still the file's fault, never a traceback
        raise ArtifactError(f"{container.path}: cannot decode tensor {entry.name[:80]!r} ({entry.encoding}): "
                            f"malformed meta ({type(exc).__name__}: {str(exc)[:120]})") from None
    if tuple(tensor.shape) != shape or tensor.dtype != entry.torch_dtype:
        raise ArtifactError(f"{container.path}: tensor {entry.name[:80]!r} decoded to {tuple(tensor.shape)} "
                            f"{tensor.dtype}, expected {shape} {entry.dtype}")
    return tensor


def tensor_payload_bytes(manifest: dict[str, Any]) -> dict[str, int]:
    """Tensor name -> bytes of its segments in the payload, from a verified manifest."""
    return {entry["name"]: sum(int(length) for _offset, length, _crc in entry["segments"])
            for entry in manifest["tensors"]}


def read_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes, int]:
    """Parse and verify header and manifest; return (manifest, payload bytes, file size)."""
    container = read_container(path)
    return container.manifest, container.payload, container.file_bytes


def _map(path: Path) -> memoryview:
    """The file's bytes, memory-mapped read-only (pages are read as tensors are decoded, never copied whole)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def _release(payload: memoryview, offset: int, length: int) -> None:
    """Drop the mapped pages of a decoded segment from memory (they are file-backed and clean)."""
    mm = payload.obj
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = len(mm) - len(payload) + offset
    start = base - base % mmap.PAGESIZE
    end = min(len(mm), base + length)
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def read_artifact(path: str | os.PathLike[str]) -> ArtifactContents:
    """Read, verify and decode every tensor of a .dsq file."""
    container = read_container(path)
    tensors = {entry.name: decode_entry(container, entry) for entry in container.entries}
    return ArtifactContents(container.manifest, tensors, container.file_bytes)
