"""Table-driven packing of 1..8-bit unsigned codes into uint8, along the last dimension.

A row of ``n`` codes of ``bits`` bits becomes ``packed_length(n, bits)`` bytes. Codes are laid out
little-endian: code ``i`` of a block occupies bits ``[i*bits, (i+1)*bits)`` of the block's
little-endian bit string, where a block is the smallest whole number of bytes that holds a whole
number of codes (1 byte for 1/2/4/8 bits, 3 bytes for 3 and 6 bits, 5 bytes for 5 bits, 7 for 7).
The tail of a row is zero-padded to a whole block, then trimmed to whole bytes.

The per-bits layout (which byte, which shift, how many bits of a code land in each byte) is computed
once into a small table; pack and unpack are then a handful of vectorised shifts and ORs.
"""

from __future__ import annotations

import math
from functools import cache

import torch

__all__ = ["pack", "packed_length", "unpack"]


@cache
def _layout(bits: int) -> tuple[int, int, tuple[tuple[int, int, int, int, int], ...]]:
    """(codes per block, bytes per block, pieces); a piece moves ``width`` bits of code ``code``
    (from bit ``code_shift`` of the code) to bit ``shift`` of byte ``byte`` of the block."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packing takes 1..8-bit codes, got {bits}")
    block_bits = bits * 8 // math.gcd(bits, 8)
    codes_per_block, bytes_per_block = block_bits // bits, block_bits // 8
    pieces = []
    for code in range(codes_per_block):
        start = code * bits
        done = 0
        while done < bits:
            pos = start + done
            byte, shift = divmod(pos, 8)
            width = min(bits - done, 8 - shift)
            pieces.append((code, byte, shift, done, width))
            done += width
    return codes_per_block, bytes_per_block, tuple(pieces)


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy once packed."""
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in ``[0, 2^bits)``) along the last dim into uint8."""
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"pack takes integer codes, got {codes.dtype}")
    if codes.dim() == 0:
        codes = codes.reshape(1)
    n = codes.shape[-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    per_block, bytes_per_block, pieces = _layout(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    blocks = -(-n // per_block)
    padded = torch.zeros(*codes.shape[:-1], blocks * per_block, dtype=torch.int32, device=codes.device)
    padded[..., :n] = codes.to(torch.int32)
    padded = padded.reshape(*codes.shape[:-1], blocks, per_block)
    out = torch.zeros(*codes.shape[:-1], blocks, bytes_per_block, dtype=torch.int32, device=codes.device)
    for code, byte, shift, code_shift, width in pieces:
        part = (padded[..., code] >> code_shift) & ((1 << width) - 1)
        out[..., byte] |= part << shift
    out = out.reshape(*codes.shape[:-1], blocks * bytes_per_block)[..., : packed_length(n, bits)]
    return out.to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` uint8 codes per row from packed bytes along the last dim."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack takes uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_length(n, bits)} bytes per row, got {packed.shape[-1]}")
    per_block, bytes_per_block, pieces = _layout(bits)
    if bits == 8:
        return packed.clone()
    # uint8 all the way (a code never exceeds a byte): each piece is one strided shift-and-mask over the
    # block column it comes from, and the codes of a block are stacked once at the end (3-7x faster than
    # OR-ing int32 pieces into a zeroed tensor; the dequant kernel runs this on every call).
    blocks = -(-n // per_block)
    lead = packed.shape[:-1]
    full = packed
    if packed.shape[-1] != blocks * bytes_per_block:
        full = packed.new_zeros(*lead, blocks * bytes_per_block)
        full[..., : packed.shape[-1]] = packed
    full = full.reshape(*lead, blocks, bytes_per_block)
    columns: list[torch.Tensor | None] = [None] * per_block
    for code, byte, shift, code_shift, width in pieces:
        part = full[..., byte]
        if shift:
            part = part >> shift
        if shift + width < 8:
            part = part & ((1 << width) - 1)
        if code_shift:
            part = part << code_shift
        previous = columns[code]
        columns[code] = part if previous is None else previous | part
    codes = torch.stack(columns, dim=-1).reshape(*lead, blocks * per_block)  # type: ignore[arg-type]
    return codes[..., :n].contiguous()
