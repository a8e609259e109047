"""Bit packing: exact round trips for every width, known layouts, sizes and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.primitives.packing import pack, packed_length, unpack


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_round_trip_is_exact(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_unpack_reads_the_little_endian_bit_string(bits, n, seed):
    """Unpack on its own (any bytes, padding bits included) against a bit-by-bit reading of the row."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (2, 3, packed_length(n, bits)), generator=g, dtype=torch.uint8)
    rows, codes = packed.reshape(6, -1).tolist(), unpack(packed, bits, n).reshape(6, n).tolist()
    for row, got in zip(rows, codes, strict=True):
        stream = int.from_bytes(bytes(row), "little")
        assert got == [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]


def test_known_layouts():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x81]
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]
    # 3-bit: 8 codes -> 3 bytes, little-endian bit string
    codes = torch.tensor([7, 0, 0, 0, 0, 0, 0, 7])
    assert pack(codes, 3).tolist() == [0x07, 0x00, 0xE0]
    assert pack(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


def test_sizes():
    assert packed_length(64, 4) == 32 and packed_length(64, 3) == 24 and packed_length(65, 2) == 17
    assert pack(torch.zeros(3, 64, dtype=torch.uint8), 3).shape == (3, 24)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.tensor([-1]), 4)
    with pytest.raises(TypeError):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="1..8"):
        pack(torch.tensor([0]), 9)
