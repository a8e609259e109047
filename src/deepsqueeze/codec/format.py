"""The .dsq container: ``magic | version | manifest length | manifest crc | JSON manifest | segments``.

Layout (little-endian)::

    8 bytes   magic  b"\\x89DSQ\\r\\n\\x1a\\n"  (PNG-style: catches text-mode and 7-bit mangling)
    u32       format version
    u64       manifest length in bytes
    u32       CRC-32 of the manifest
    ...       manifest: UTF-8 JSON, keys sorted (same inputs -> same bytes)
    ...       segments, concatenated; each tensor entry lists (offset, length, crc32) of its own

No pickle anywhere: tensors are encoded by registered encodings into plain bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.core.encoding import get_encoding
from deepsqueeze.errors import ArtifactError

MAGIC = b"\x89DSQ\r\n\x1a\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQI")

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


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


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ArtifactError(f"cannot store tensors of dtype {name}: supported dtypes are {', '.join(_DTYPES)}")
    return name


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
        manifest_bytes = json.dumps(full_manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), zlib.crc32(manifest_bytes))

        def write(fh: Any) -> None:
            fh.write(header + manifest_bytes)
            self._spool.seek(0)
            while chunk := self._spool.read(1 << 22):
                fh.write(chunk)

        atomic_write(self.path, write)
        return len(header) + len(manifest_bytes) + self._offset


def write_artifact(path: str | os.PathLike[str], manifest: dict[str, Any], tensors: list[TensorEntry]) -> int:
    """Encode ``tensors``, write the container atomically to ``path``, return its size in bytes."""
    with ArtifactWriter(path) as writer:
        for item in tensors:
            writer.add(item)
        return writer.finish(manifest)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail fast, before any work, if ``path`` cannot be written as a file.

    Raises ``ArtifactError`` when ``path`` is a folder, its folder is missing, or the folder refuses a new
    file (permissions, read-only filesystem): a probe file is created there and removed at once.
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder: name a file inside it, e.g. {path / 'model.dsq'}")
    if not path.parent.is_dir():
        raise ArtifactError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc} in {path.parent}; choose another location"
                            ) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Call ``write(binary file)`` on a temporary file in ``path``'s folder, fsync, then rename it to ``path``."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, a folder appearing at ``path`` meanwhile ...
        Path(tmp).unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], memoryview, int]:
    """Parse and verify header and manifest; return (manifest, payload (a view of the mapped file), file size)."""
    path = Path(path)
    try:
        data = _map(path)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder, not a .dsq artifact") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror}") from None
    if len(data) < _HEADER.size or bytes(data[: len(MAGIC)]) != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise ArtifactError(f"{path} is truncated ({len(data)} bytes): re-create it with deepsqueeze compress")
        raise ArtifactError(f"{path} is not a deepsqueeze artifact (bad magic bytes)")
    _, version, manifest_len, manifest_crc = _HEADER.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} uses .dsq format version {version}, newer than this deepsqueeze reads ({FORMAT_VERSION}): "
            "upgrade deepsqueeze"
        )
    start = _HEADER.size
    if start + manifest_len > len(data):
        raise ArtifactError(f"{path} is truncated: the manifest runs past the end of the file; re-create it")
    manifest_bytes = bytes(data[start : start + manifest_len])
    if zlib.crc32(manifest_bytes) != manifest_crc:
        raise ArtifactError(f"{path} is corrupted: manifest checksum mismatch; re-create it")
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{path} is corrupted: its manifest is not valid JSON") from None
    return manifest, data[start + manifest_len :], len(data)


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
    manifest, payload, size = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for entry in manifest["tensors"]:
            name = entry["name"]
            segments = []
            for offset, length, crc in entry["segments"]:
                seg = payload[offset : offset + length]
                if len(seg) != length:
                    raise ArtifactError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
                if zlib.crc32(seg) != crc:
                    raise ArtifactError(f"{path} is corrupted: checksum mismatch in tensor {name!r}")
                segments.append(bytes(seg))
                _release(payload, offset, length)
            if entry["dtype"] not in _DTYPES:
                raise ArtifactError(f"{path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
            shape = tuple(int(s) for s in entry["shape"])
            encoding = get_encoding(entry["encoding"])
            try:
                tensor = encoding.decode(entry["meta"], segments, shape, _DTYPES[entry["dtype"]])
            except ArtifactError:
                raise
            except Exception as exc:  # a decoder meeting inconsistent data must not crash the caller
                raise ArtifactError(f"{path}: cannot decode tensor {name!r} ({entry['encoding']}): {exc}") from None
            if tuple(tensor.shape) != shape:
                raise ArtifactError(f"{path}: tensor {name!r} decoded to shape {tuple(tensor.shape)}, expected {shape}")
            tensors[name] = tensor
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} has a malformed manifest ({type(exc).__name__}: {exc}); re-create it") from None
    return ArtifactContents(manifest, tensors, size)
