import hashlib
import json
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.codec import FORMAT_VERSION, MAGIC, TensorEntry, read_artifact, write_artifact
from deepsqueeze.codec.format import read_manifest
from deepsqueeze.errors import ArtifactError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool, torch.int16]


def _tensors() -> list[TensorEntry]:
    g = torch.Generator().manual_seed(0)
    return [
        TensorEntry("w", torch.randn(3, 5, generator=g)),
        TensorEntry("codes", torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g)),
        TensorEntry("empty", torch.empty(0, 4)),
        TensorEntry("scalar", torch.tensor(3.5, dtype=torch.float64)),
    ]


def test_round_trip_is_bit_exact_for_every_dtype(tmp_path):
    entries = [TensorEntry(f"t{i}", (torch.arange(24) % 7).reshape(2, 3, 4).to(dt)) for i, dt in enumerate(DTYPES)]
    entries += _tensors()
    size = write_artifact(tmp_path / "a.dsq", {"base": {"kind": "test"}}, entries)
    contents = read_artifact(tmp_path / "a.dsq")
    assert contents.file_bytes == size == (tmp_path / "a.dsq").stat().st_size
    assert contents.manifest["version"] == FORMAT_VERSION
    for entry in entries:
        got = contents.tensors[entry.name]
        assert got.dtype == entry.tensor.dtype and torch.equal(got, entry.tensor)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), max_size=50))
def test_round_trip_property(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("p") / "p.dsq"
    t = torch.tensor(values, dtype=torch.float32)
    write_artifact(path, {}, [TensorEntry("x", t)])
    assert torch.equal(read_artifact(path).tensors["x"], t)


def test_same_inputs_give_the_same_bytes(tmp_path):
    write_artifact(tmp_path / "a.dsq", {"base": {"b": 1, "a": 2}}, _tensors())
    write_artifact(tmp_path / "b.dsq", {"base": {"a": 2, "b": 1}}, _tensors())
    assert (tmp_path / "a.dsq").read_bytes() == (tmp_path / "b.dsq").read_bytes()


def test_header_layout(tmp_path):
    write_artifact(tmp_path / "a.dsq", {}, _tensors())
    data = (tmp_path / "a.dsq").read_bytes()
    magic, version, length, crc, digest = struct.unpack_from("<8sIQI32s", data)
    assert magic == MAGIC and version == FORMAT_VERSION == 4
    manifest = data[56 : 56 + length]
    assert zlib.crc32(manifest) == crc and json.loads(zlib.decompress(manifest))["format"] == "deepsqueeze"
    assert hashlib.sha256(data[56:]).digest() == digest


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "a.dsq"
    write_artifact(path, {}, _tensors())
    return path


def test_every_flipped_byte_is_detected(artifact, tmp_path):
    data = artifact.read_bytes()
    for position in range(0, len(data), max(1, len(data) // 97)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x40
        bad = tmp_path / "bad.dsq"
        bad.write_bytes(bytes(corrupted))
        with pytest.raises(ArtifactError):
            read_artifact(bad)


@pytest.mark.parametrize("keep", [0, 3, 10, 30, -1])
def test_truncated_files_are_artifact_errors(artifact, tmp_path, keep):
    data = artifact.read_bytes()
    bad = tmp_path / "t.dsq"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ArtifactError):
        read_artifact(bad)


def test_foreign_newer_and_missing_files(artifact, tmp_path):
    foreign = tmp_path / "f.dsq"
    foreign.write_bytes(b"PK\x03\x04 a zip file, not ours" * 3)
    with pytest.raises(ArtifactError, match="not a deepsqueeze artifact"):
        read_artifact(foreign)
    newer = bytearray(artifact.read_bytes())
    struct.pack_into("<I", newer, 8, FORMAT_VERSION + 1)
    (tmp_path / "n.dsq").write_bytes(bytes(newer))
    with pytest.raises(ArtifactError, match="newer"):
        read_manifest(tmp_path / "n.dsq")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "missing.dsq")
    with pytest.raises(ArtifactError, match="folder"):
        read_artifact(tmp_path)


def test_unknown_encoding_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="unknown"):
        write_artifact(tmp_path / "x.dsq", {}, [TensorEntry("x", torch.ones(2), encoding="from-the-future")])
    assert not (tmp_path / "x.dsq").exists()


def test_failed_write_leaves_no_file_behind(tmp_path):
    with pytest.raises(ArtifactError):
        write_artifact(tmp_path / "missing-dir" / "x.dsq", {}, _tensors())
    assert list(tmp_path.iterdir()) == []
