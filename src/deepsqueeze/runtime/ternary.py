"""Ternary weights with separate positive and negative scales per output channel (trained ternary
quantization, TTQ: Zhu et al., ICLR 2017): ``w in {-neg_scale, 0, +scale}``.

Stored like the other packed weight-only layers: 2-bit codes (0: negative, 1: zero, 2: positive) packed
four per byte, plus two float32 scales per output channel. :class:`PackedTernaryLinear` /
:class:`PackedTernaryConv2d` are :class:`PackedIntLinear` / :class:`PackedIntConv2d` with the extra
``neg_scale`` buffer; QAT's ``convert`` installs them for ``weights: ttq``.
"""

from __future__ import annotations

from typing import Any

import torch

from deepsqueeze.runtime.packed import PackedIntConv2d, PackedIntLinear

__all__ = ["PackedTernaryConv2d", "PackedTernaryLinear"]


def _ternary_rows(codes: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    q = codes.to(torch.int64)
    zero = torch.zeros((), dtype=pos.dtype)
    return torch.where(q == 2, pos, torch.where(q == 0, -neg, zero))


class PackedTernaryLinear(PackedIntLinear):
    """Linear with 2-bit ternary codes; ``scale`` (out, 1) is the positive level, ``neg_scale`` (out, 1) the negative."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, 2, None, bias)
        self.register_buffer("neg_scale", torch.ones(out_features, 1))

    def set_levels(self, codes: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> None:
        """Codes in {-1, 0, 1} (out, in) with the per-row positive and negative scales (out, 1)."""
        self.set_codes((codes + 1).to(torch.uint8), pos, torch.ones_like(pos, dtype=torch.uint8))
        self.neg_scale.copy_(neg.reshape(self.neg_scale.shape).float())

    def dequantized_rows(self) -> torch.Tensor:
        return _ternary_rows(self.int_codes(), self.scale, self.neg_scale)

    def ideal_bits(self) -> int:
        return super().ideal_bits() + self.neg_scale.numel() * 32

    def replay_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}


class PackedTernaryConv2d(PackedIntConv2d):
    """Conv2d with 2-bit ternary codes and per-output-channel positive / negative scales."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, 2, None)
        self.register_buffer("neg_scale", torch.ones(out_channels, 1))

    set_levels = PackedTernaryLinear.set_levels

    def dequantized_rows(self) -> torch.Tensor:
        return _ternary_rows(self.int_codes(), self.scale, self.neg_scale)

    def ideal_bits(self) -> int:
        return super().ideal_bits() + self.neg_scale.numel() * 32

    def replay_params(self) -> dict[str, Any]:
        params = super().replay_params()
        for key in ("bits", "group_size", "binary"):
            params.pop(key)
        return params
