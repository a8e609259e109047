"""Round trips and bounds for the Huffman and ANS coders, coded streams and sparse index coding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.codec import ans, huffman
from deepsqueeze.codec.bits import Reader, pack_fixed, unpack_fixed, write_varint
from deepsqueeze.codec.entropy import Coder, decode_stream, encode_stream, shannon_bits
from deepsqueeze.codec.sparse_index import (
    PositionScheme,
    decode_positions,
    encode_positions,
    gap_symbols,
    positions_from_gaps,
)
from deepsqueeze.errors import ArtifactError

streams = st.one_of(
    st.lists(st.integers(0, 40), max_size=300),                    # random, includes empty
    st.lists(st.just(7), min_size=1, max_size=50),                 # a single symbol
    st.builds(lambda n, k: [0] * n + [k], st.integers(1, 2000), st.integers(1, 300)),  # extreme skew
)


@settings(max_examples=60, deadline=None)
@given(streams, st.sampled_from(list(Coder)))
def test_stream_round_trip_is_identity(values: list[int], coder: Coder) -> None:
    symbols = np.asarray(values, dtype=np.int64)
    data, stats = encode_stream(symbols, coder=coder)
    assert np.array_equal(decode_stream(data), symbols)
    assert stats.coded_bytes == len(data)
    assert stats.count == len(values)


@settings(max_examples=40, deadline=None)
@given(streams)
def test_raw_coders_round_trip(values: list[int]) -> None:
    symbols = np.asarray(values, dtype=np.int64)
    alphabet = int(symbols.max()) + 1 if symbols.size else 1
    for coder in (huffman, ans):
        assert np.array_equal(coder.decode(coder.encode(symbols, alphabet), symbols.size, alphabet), symbols)


def test_huffman_lengths_are_optimal_and_limited() -> None:
    counts = np.array([45, 13, 12, 16, 9, 5])  # the textbook example: lengths 1,3,3,3,4,4
    assert huffman.code_lengths(counts).tolist() == [1, 3, 3, 3, 4, 4]
    fib = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765,
                    10946, 17711, 28657, 46368, 75025])  # would need 24-bit codes unlimited
    lengths = huffman.code_lengths(fib, limit=12)
    assert lengths.max() <= 12
    assert np.sum(2.0 ** -lengths) <= 1.0


def test_ans_is_within_one_percent_of_shannon_and_huffman_within_one_bit() -> None:
    rng = np.random.default_rng(0)
    symbols = np.clip(np.round(rng.laplace(0, 2, 50_000)).astype(np.int64) + 16, 0, 31)
    bound = shannon_bits(symbols)
    _, a = encode_stream(symbols, 32, Coder.ANS)
    _, h = encode_stream(symbols, 32, Coder.HUFFMAN)
    assert 8 * a.coded_bytes <= 1.01 * bound
    assert bound <= 8 * h.coded_bytes <= bound + symbols.size + 8 * 64
    _, best = encode_stream(symbols, 32)
    assert best.coded_bytes == min(a.coded_bytes, h.coded_bytes) and best.coder == "ans"


def test_corrupt_streams_raise_artifact_error_not_crash() -> None:
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 9, 3000)
    for coder in (Coder.HUFFMAN, Coder.ANS):
        data, _ = encode_stream(symbols, 9, coder)
        for cut in (1, 3, len(data) // 2, len(data) - 1):
            with pytest.raises(ArtifactError):
                decode_stream(data[:cut])
        with pytest.raises(ArtifactError):
            decode_stream(bytes([9]) + data[1:])
    huff = bytearray(encode_stream(symbols, 9, Coder.HUFFMAN)[0])
    huff[3] = 0xFF  # code lengths that break the Kraft inequality
    with pytest.raises(ArtifactError):
        decode_stream(bytes(huff))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=64))
def test_decoders_never_crash_on_garbage(data: bytes) -> None:
    for decode in (lambda d: decode_stream(d), lambda d: decode_positions(d, 100, (10, 10))):
        try:
            decode(data)
        except ArtifactError:
            pass


masks = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(st.integers(1, 12), st.integers(1, 40), st.floats(0, 1), st.just(seed))
)


@settings(max_examples=60, deadline=None)
@given(masks, st.sampled_from(list(PositionScheme)))
def test_positions_round_trip(spec: tuple[int, int, float, int], scheme: PositionScheme) -> None:
    rows, cols, density, seed = spec
    mask = np.random.default_rng(seed).random((rows, cols)) < density
    data = encode_positions(mask, (rows, cols), scheme)
    assert np.array_equal(decode_positions(data, mask.size, (rows, cols)), mask.ravel())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=200, unique=True), st.integers(1, 10))
def test_gap_symbols_round_trip(positions: list[int], width: int) -> None:
    pos = np.asarray(sorted(positions), dtype=np.int64)
    symbols = gap_symbols(pos, width)
    assert symbols.max(initial=0) < 1 << width
    assert np.array_equal(positions_from_gaps(symbols, width, 5001), pos)


def test_fixed_width_packing_and_varints_round_trip() -> None:
    values = np.arange(0, 1000) % 37
    assert np.array_equal(unpack_fixed(pack_fixed(values, 6), 6, values.size), values)
    out = bytearray()
    for v in (0, 1, 127, 128, 2**40):
        write_varint(out, v)
    reader = Reader(bytes(out))
    assert [reader.varint() for _ in range(5)] == [0, 1, 127, 128, 2**40]
    reader.finish()
    with pytest.raises(ArtifactError):
        Reader(b"\x80").varint()
