"""The container as untrusted input (issue 15 findings 2, 6): header version, whole-file digest, bounded
manifest JSON, tensor entries checked against the payload before any decoder runs."""

import json
import os
import stat
import struct

import pytest
import torch

from deepsqueeze.codec.format import FORMAT_VERSION, TensorEntry, read_artifact, write_artifact
from deepsqueeze.errors import ArtifactError
from deepsqueeze.testing.forge import assemble_artifact, forge_manifest, reseal, split_artifact


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "a.dsq"
    g = torch.Generator().manual_seed(0)
    write_artifact(path, {}, [TensorEntry("w", torch.randn(3, 5, generator=g)),
                              TensorEntry("b", torch.arange(4, dtype=torch.int32))])
    return path


def _edit(artifact, tmp_path, fn):
    return forge_manifest(artifact, tmp_path / "forged.dsq", fn)


def test_version_zero_is_refused(artifact, tmp_path):
    data = bytearray(artifact.read_bytes())
    struct.pack_into("<I", data, 8, 0)
    (tmp_path / "v0.dsq").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="version 0"):
        read_artifact(tmp_path / "v0.dsq")


def test_digest_covers_the_whole_file(artifact, tmp_path):
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1  # a payload byte: the segment CRC would catch it too, the digest catches it first
    (tmp_path / "d.dsq").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        read_artifact(tmp_path / "d.dsq")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_earlier_formats_still_load(artifact, tmp_path, version):
    """Format 1 (no digest), format 2 (the manifest stored as plain JSON) and format 3 (no 2-byte floats)."""
    _, manifest, payload = split_artifact(artifact.read_bytes())
    old = json.loads(manifest)
    old["version"] = version
    (tmp_path / "old.dsq").write_bytes(assemble_artifact(old, payload, version=version))
    tensors = read_artifact(tmp_path / "old.dsq").tensors
    assert torch.equal(tensors["b"], torch.arange(4, dtype=torch.int32))


def test_the_manifest_is_stored_deflated_and_a_small_model_file_is_mostly_tensors(tmp_path):
    """Issue 24's quality-budget row: a 43K-parameter residual CNN after Deep Compression was a 28 KB file, of
    which 14 KB was manifest JSON (per-tensor specs, coverage, stage records); the 10x size target was missed
    by the container, not by the compression."""
    import zlib

    from deepsqueeze.artifact import save
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.prune import PruneConfig, prune_
    from deepsqueeze.share import EncodeConfig, ShareConfig, encode_, share_
    from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle

    model = tiny_model_handle()
    ctx = StageContext(model, data=tiny_classification_data(), progress=False)
    prune_(model, PruneConfig(sparsity=0.9), ctx)
    share_(model, ShareConfig(bits=4), ctx)
    encode_(model, EncodeConfig(), ctx)
    save(model, tmp_path / "dc.dsq")
    data = (tmp_path / "dc.dsq").read_bytes()
    length = struct.unpack_from("<8sIQI32s", data)[2]
    stored = data[56 : 56 + length]
    manifest = zlib.decompress(stored)
    assert len(stored) < len(manifest) / 2, (len(stored), len(manifest))
    assert json.loads(manifest) == read_artifact(tmp_path / "dc.dsq").manifest


@pytest.mark.parametrize("damage", ["bomb", "truncated", "trailing", "not-zlib"])
def test_a_hostile_deflated_manifest_is_an_artifact_error(tmp_path, damage):
    """A deflate stream that inflates past the manifest bound (a bomb: a few hundred bytes stored, 128 MB
    inflated), stops early, carries bytes after its end, or is no stream at all: one ArtifactError, nothing
    allocated past the bound."""
    import zlib

    if damage == "bomb":
        inflater = zlib.compressobj(9)
        stored = inflater.compress(b'{"tensors":[],"x":"') + b"".join(
            inflater.compress(b"a" * (1 << 24)) for _ in range(8)) + inflater.flush()
    else:
        stored = zlib.compress(b'{"tensors": []}', 9)
        stored = {"truncated": stored[:-3], "trailing": stored + b"\x00", "not-zlib": b"{}"}[damage]
    (tmp_path / "z.dsq").write_bytes(assemble_artifact(stored, b"", stored=True))
    with pytest.raises(ArtifactError, match="out of proportion" if damage == "bomb" else "malformed"):
        read_artifact(tmp_path / "z.dsq")


def test_artifacts_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_artifact(tmp_path / "m.dsq", {}, [TensorEntry("x", torch.ones(2))])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.dsq").stat().st_mode) == 0o644


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                          # RecursionError today
    b'{"tensors": [], "x": ' + b"9" * 5000 + b"}",            # ValueError (int digits) today
    b'{"tensors": [], "x": NaN}',
    b'{"tensors": [], "x": 1e999}',
    b'{"tensors": []' + b', "x": {"a": ' * 40 + b"1" + b"}" * 40 + b"}",
    b"\xff\xfe not utf-8",
])
def test_hostile_manifest_json_is_an_artifact_error(tmp_path, body):
    (tmp_path / "j.dsq").write_bytes(assemble_artifact(body, b""))
    with pytest.raises(ArtifactError, match="malformed|corrupted"):
        read_artifact(tmp_path / "j.dsq")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("segments", [[-4, 4, 0]], "segments"),                  # negative offset: read from the file's end today
    ("segments", [[0, 1 << 40, 0]], "past the end"),
    ("shape", [-1, 5], "shape"),
    ("shape", [10**9, 10**9], "shape"),
    ("shape", "35", "shape"),
    ("dtype", "complex64", "dtype"),
    ("dtype", {"__class__": "x"}, "dtype"),
    ("name", ["w"], "name"),
    ("meta", [], "meta"),
    ("encoding", 7, "encoding"),
])
def test_malformed_tensor_entries_name_the_field(artifact, tmp_path, field, value, needle):
    def edit(manifest):
        manifest["tensors"][0][field] = value

    with pytest.raises(ArtifactError, match=needle):
        read_artifact(_edit(artifact, tmp_path, edit))


def test_overlapping_segments_are_refused(artifact, tmp_path):
    def edit(manifest):
        manifest["tensors"][1]["segments"] = manifest["tensors"][0]["segments"]

    with pytest.raises(ArtifactError, match="overlap"):
        read_artifact(_edit(artifact, tmp_path, edit))


def test_a_raw_dtype_change_never_reinterprets_bytes(artifact, tmp_path):
    def edit(manifest):  # float32 (3, 5) -> int32 (3, 5): same byte count, different meaning
        manifest["tensors"][0]["dtype"] = "int32"

    forged = _edit(artifact, tmp_path, edit)
    tensors = read_artifact(forged).tensors  # the container alone cannot know; the loader compares with the model
    assert tensors["w"].dtype == torch.int32


def test_reseal_recomputes_checksums(artifact):
    assert reseal(artifact.read_bytes()) == artifact.read_bytes()
    assert FORMAT_VERSION == 4


@pytest.mark.parametrize("encoding", ["codebook", "codebook-entropy", "sparse-codebook",
                                      "sparse-codebook-entropy", "sparse", "raw"])
def test_a_huge_claimed_shape_fails_before_allocating(tmp_path, encoding):
    import resource

    import deepsqueeze.prune  # noqa: F401  (registers the sparse encoding)

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 16, generator=g) * 4).round() / 4
    w[w.abs() < 0.5] = 0
    write_artifact(tmp_path / "s.dsq", {}, [TensorEntry("w", w, encoding)])
    assert torch.equal(read_artifact(tmp_path / "s.dsq").tensors["w"], w)

    def edit(manifest):
        manifest["tensors"][0]["shape"] = [10**9, 2]  # 6.5 GB and growing in the codebook decoder today

    forged = forge_manifest(tmp_path / "s.dsq", tmp_path / "big.dsq", edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="shape|elements"):
        read_artifact(forged)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing of 2e9 elements
