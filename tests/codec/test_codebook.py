"""Codebook encodings: exact round trips on random / empty / constant / skewed tensors, sizes, and
corrupt input that must raise ArtifactError."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.codec.codebook import analyze, split_codebook
from deepsqueeze.codec.format import TensorEntry, read_artifact, write_artifact
from deepsqueeze.core.encoding import get_encoding
from deepsqueeze.errors import ArtifactError

ENCODINGS = ["codebook", "codebook-entropy", "sparse-codebook", "sparse-codebook-entropy"]


def _shared_tensor(shape: tuple[int, ...], k: int, density: float, skew: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(k, generator=g)
    if skew:  # nearly every entry takes the first value
        idx = (torch.rand(shape, generator=g) < 0.01).long() * torch.randint(0, k, shape, generator=g)
    else:
        idx = torch.randint(0, k, shape, generator=g)
    keep = torch.rand(shape, generator=g) < density
    return torch.where(keep, centroids[idx], torch.zeros(()))


tensors = st.builds(
    _shared_tensor,
    st.one_of(st.just((0,)), st.just((1,)), st.tuples(st.integers(1, 20)),
              st.tuples(st.integers(1, 12), st.integers(1, 30)), st.tuples(st.integers(1, 4), st.integers(1, 3),
                                                                          st.integers(1, 3), st.integers(1, 3))),
    st.integers(1, 40), st.sampled_from([0.0, 0.05, 0.3, 1.0]), st.booleans(), st.integers(0, 2**16))


@settings(max_examples=80, deadline=None)
@given(tensors, st.sampled_from(ENCODINGS))
def test_round_trip_is_exact(tensor: torch.Tensor, name: str) -> None:
    encoding = get_encoding(name)
    meta, segments = encoding.encode(tensor)
    out = encoding.decode(meta, segments, tuple(tensor.shape), tensor.dtype)
    assert out.dtype == tensor.dtype and torch.equal(out, tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_other_float_dtypes(dtype: torch.dtype) -> None:
    t = _shared_tensor((30, 20), 16, 0.2, False, 1).to(dtype)
    for name in ENCODINGS:
        encoding = get_encoding(name)
        meta, segments = encoding.encode(t)
        assert torch.equal(encoding.decode(meta, segments, tuple(t.shape), dtype), t)


def test_fixed_width_sizes_and_manifest_choices() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centroids = torch.linspace(-1, 1, 32)
    idx = (torch.distributions.Laplace(16.0, 3.0).sample((300, 784)).round().clamp(0, 31)).long()
    t = torch.where(torch.rand(300, 784, generator=g) < 0.07, centroids[idx], torch.zeros(()))
    _, mask, indices = split_codebook(t, sparse=True)
    meta, segments = get_encoding("sparse-codebook").encode(t)
    k = torch.unique(t[t != 0]).numel()
    assert meta["k"] == k > 8 and meta["idx"] == "fixed" and meta["pos"] == "gaps-fixed"
    assert len(segments[0]) == k * 4
    assert len(segments[2]) == math.ceil(indices.size * math.ceil(math.log2(k)) / 8)
    meta_e, seg_e = get_encoding("sparse-codebook-entropy").encode(t)
    assert meta_e["idx"] in ("huffman", "ans") and meta_e["pos"] in ("gaps", "bitmap")
    assert sum(map(len, seg_e)) < sum(map(len, segments))
    stats = analyze("w", t)
    # a skewed index stream: entropy-coded within 1% of its Shannon bound (+ the count table)
    assert stats.index.coded_bytes <= 1.01 * stats.index.entropy_bits / 8 + 80
    assert stats.index.coded_bytes < 0.9 * len(segments[2])
    assert stats.nonzero == int(mask.sum()) and stats.total_bytes == sum(map(len, seg_e))
    uniform = _shared_tensor((50, 60), 32, 1.0, False, 1)  # no skew: fixed width beats the code tables
    assert get_encoding("codebook-entropy").encode(uniform)[0]["idx"] == "fixed"


def test_too_many_distinct_values_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match="share stage"):
        get_encoding("codebook").encode(torch.arange(70_000, dtype=torch.float32))
    with pytest.raises(ArtifactError, match="floating-point"):
        get_encoding("codebook").encode(torch.arange(10))


def test_corrupt_segments_raise_artifact_error() -> None:
    t = _shared_tensor((40, 50), 8, 0.2, False, 3)
    for name in ENCODINGS:
        encoding = get_encoding(name)
        meta, segments = encoding.encode(t)
        shape = tuple(t.shape)
        with pytest.raises(ArtifactError):
            encoding.decode(meta, segments[:-1], shape, t.dtype)
        with pytest.raises(ArtifactError):
            encoding.decode({**meta, "k": -1}, segments, shape, t.dtype)
        with pytest.raises(ArtifactError):
            encoding.decode({**meta, "k": meta["k"] + 1}, segments, shape, t.dtype)  # codebook length mismatch
        with pytest.raises(ArtifactError):
            encoding.decode(meta, [*segments[:-1], segments[-1][:-1]], shape, t.dtype)  # truncated indices
        if name.startswith("sparse"):
            with pytest.raises(ArtifactError):
                encoding.decode(meta, [segments[0], segments[1][:2], segments[2]], shape, t.dtype)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40), st.sampled_from(ENCODINGS), st.integers(0, 5))
def test_decoders_never_crash_on_garbage(pos: bytes, idx: bytes, name: str, k: int) -> None:
    segments = [np.zeros(k, np.float32).tobytes()] + ([pos] if name.startswith("sparse") else []) + [idx]
    meta = {"k": k, "idx": "fixed" if "entropy" not in name else "ans"}
    try:
        out = get_encoding(name).decode(meta, segments, (6, 7), torch.float32)
    except ArtifactError:
        return
    assert out.shape == (6, 7)


def test_a_float32_tensor_a_two_byte_float_holds_is_stored_in_two_bytes_bit_for_bit(tmp_path):
    """Issue 24's quality-budget row: on a 43K-parameter residual CNN after Deep Compression, fp32 codebooks
    (3.9 KB) and BatchNorm tensors (4 KB) were over half the file. Values a 2-byte float holds exactly are stored
    in it (float16, else bfloat16: past float16's range), read back as the same float32 bits; others stay raw."""
    from deepsqueeze.codec.format import read_manifest

    halves = torch.randn(300).half().float()
    big = (torch.randn(50) * 1e6).bfloat16().float()  # past float16's range, exact in bfloat16
    entries = [TensorEntry("halves", halves, "narrow-float"), TensorEntry("big", big, "narrow-float"),
               TensorEntry("neg0", torch.tensor([-0.0, 0.0, 1.5]), "narrow-float")]
    write_artifact(tmp_path / "n.dsq", {"ref": "t"}, entries)
    specs = {e["name"]: e for e in read_manifest(tmp_path / "n.dsq")[0]["tensors"]}
    assert specs["halves"]["meta"] == {"as": "float16"} and specs["big"]["meta"] == {"as": "bfloat16"}
    assert specs["halves"]["segments"][0][1] == 600
    tensors = read_artifact(tmp_path / "n.dsq").tensors
    for name, want in (("halves", halves), ("big", big), ("neg0", torch.tensor([-0.0, 0.0, 1.5]))):
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name].view(torch.int32), want.view(torch.int32)), name
    with pytest.raises(ArtifactError, match="2-byte float"):
        write_artifact(tmp_path / "x.dsq", {"ref": "t"}, [TensorEntry("x", torch.tensor([0.1]), "narrow-float")])


def test_the_writer_narrows_exactly_what_it_can_and_codebooks_too(tmp_path):
    from deepsqueeze.codec.encodings import stored_encoding

    assert stored_encoding("raw", torch.ones(4)) == "narrow-float"
    assert stored_encoding("raw", torch.tensor([0.1, 1.0])) == "raw"
    assert stored_encoding("raw", torch.ones(4, dtype=torch.float64)) == "raw"
    assert stored_encoding("codebook", torch.ones(4)) == "codebook"
    weight = torch.randn(64, 64).half().float()
    weight[weight.abs() < 0.8] = 0
    weight = (weight * 4).round() / 4  # a few distinct values, exact in float16
    meta, segments = get_encoding("sparse-codebook-entropy").encode(weight)
    assert meta["cb"] == "float16" and len(segments[0]) == 2 * meta["k"]
    assert torch.equal(get_encoding("sparse-codebook-entropy").decode(meta, segments, (64, 64), torch.float32), weight)
    meta32, segments32 = get_encoding("sparse-codebook-entropy").encode(weight + 1e-4 * (weight != 0))
    assert "cb" not in meta32 and len(segments32[0]) == 4 * meta32["k"]


@pytest.mark.parametrize("meta", [{"as": "float8"}, {"as": 16}, {"as": "float16", "x": 1}, {}])
def test_a_forged_narrow_float_is_an_artifact_error(meta):
    with pytest.raises(ArtifactError, match="narrow-float"):
        get_encoding("narrow-float").decode(meta, [b"\x00\x3c"], (1,), torch.float32)
    with pytest.raises(ArtifactError):
        get_encoding("narrow-float").decode({"as": "float16"}, [b"\x00\x3c\x00"], (2,), torch.float32)


def test_a_forged_codebook_type_is_an_artifact_error():
    weight = torch.tensor([[0.0, 0.5], [0.25, 0.0]])
    meta, segments = get_encoding("sparse-codebook").encode(weight)
    with pytest.raises(ArtifactError, match="codebook type"):
        get_encoding("sparse-codebook").decode({**meta, "cb": "float64"}, segments, (2, 2), torch.float32)
    with pytest.raises(ArtifactError, match="corrupted"):
        get_encoding("sparse-codebook").decode({**meta, "cb": "bfloat16"}, [segments[0] + b"\x00"] + segments[1:],
                                              (2, 2), torch.float32)
