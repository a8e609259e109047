"""The layers a factorization installs: thin products of ordinary Linear / Conv2d layers.

They are named by what they are (a low-rank Linear, a Tucker-2 or CP convolution), hold plain
``nn.Linear``/``nn.Conv2d`` children (so quantization, pruning and LoRA can address the factors by
name), and can be built empty from their shapes, which is how the loader replays them. Each runs its
factors or the one dense layer they equal, whichever raced faster for its shape and batch on this CPU
(:func:`~deepsqueeze.runtime.kernels.factored_kernel`): at large batches one dense product can beat
three thin ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import UnsupportedLayerError
from deepsqueeze.primitives.factorize import cp_factors, svd_factors, tucker2_factors
from deepsqueeze.runtime.kernels import Cached, factored_kernel, preferred


class _Factored(Cached):
    """A chain of plain layers that runs as the chain or as the one dense layer it equals (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self._kernels: dict[tuple[Any, ...], str] = {}  # (batch kind, input size...) -> kernel chosen

    def has_dense_form(self) -> bool:
        """Whether every factor is a plain float Linear / Conv2d (a quantized or pruned factor is not)."""
        return all(type(m) in (nn.Linear, nn.Conv2d) and m.weight.dtype == torch.float32 for m in self.children())

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _held_dense_weight(self) -> torch.Tensor:
        """:meth:`dense_weight`, kept between calls where speed is preferred (rebuilt once a factor changed)."""
        if preferred() != "speed":
            return self.dense_weight()
        versions = tuple(p._version for p in self.parameters())
        held = self._cache.get("dense")
        if held is None or held[0] != versions:
            held = self._cache["dense"] = (versions, self.dense_weight().detach())
        return held[1]

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and "_kernels" in self.__dict__:  # a factor replaced (quantized, pruned)
            self._kernels.clear()
            self._cache.pop("dense", None)
        super().__setattr__(name, value)

    def kernel_choices(self) -> dict[str, str]:
        """Batch kind -> kernel chosen so far in this process (``factors`` or ``dense``)."""
        return {kind[0]: kernel for kind, kernel in self._kernels.items()}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._kernels.clear()
        return super()._apply(fn, recurse)


class LowRankLinear(_Factored):
    """``y = second(first(x))``: a Linear of rank ``rank`` stored as ``in -> rank -> out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear`` (truncated SVD), bias kept as is."""
        out = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        first, second = svd_factors(linear.weight.data, rank)
        with torch.no_grad():
            out.first.weight.copy_(first)
            out.second.weight.copy_(second)
            if linear.bias is not None:
                out.second.bias.copy_(linear.bias)
        return out.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = (self.dense_forward if factored_kernel(self, x2) == "dense" else self.factored_forward)(x2)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._held_dense_weight(), self.second.bias)

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight this product equals."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def conv_geometry(conv: nn.Conv2d) -> dict:
    """The JSON-serializable hyper-parameters of a Conv2d that a factored replacement must keep."""
    if conv.groups != 1:
        raise UnsupportedLayerError(f"grouped convolution (groups={conv.groups}) cannot be Tucker/CP factored")
    if isinstance(conv.padding, str):
        raise UnsupportedLayerError(f"convolution with padding={conv.padding!r} cannot be factored: use integer padding")
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(f"convolution with padding_mode={conv.padding_mode!r} cannot be factored")
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
        "padding": list(conv.padding), "dilation": list(conv.dilation), "bias": conv.bias is not None,
    }


class _FactoredConv(_Factored):
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and factored_kernel(self, x) == "dense":
            return self.dense_forward(x)
        return self.factored_forward(x)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._held_dense_weight(), self.last.bias, self.stride, self.padding, self.dilation)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Tucker2Conv2d(_FactoredConv):
    """``1x1 (I -> r_in) -> kxk core (r_in -> r_out, the original stride/padding) -> 1x1 (r_out -> O)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int] | tuple[int, int],
                 ranks: tuple[int, int] | list[int], stride: list[int] | tuple[int, int] = (1, 1),
                 padding: list[int] | tuple[int, int] = (0, 0), dilation: list[int] | tuple[int, int] = (1, 1),
                 bias: bool = True) -> None:
        super().__init__()
        r_out, r_in = int(ranks[0]), int(ranks[1])
        self.in_channels, self.out_channels, self.ranks = in_channels, out_channels, (r_out, r_in)
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False)
        self.core = nn.Conv2d(r_in, r_out, tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
                              dilation=tuple(dilation), bias=False)
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int]) -> Tucker2Conv2d:
        """Tucker-2 (HOOI) of ``conv``'s kernel at ``(r_out, r_in)``, bias kept as is."""
        out = cls(**conv_geometry(conv), ranks=ranks)
        first, core, last = tucker2_factors(conv.weight.data, ranks)
        with torch.no_grad():
            out.first.weight.copy_(first[:, :, None, None])
            out.core.weight.copy_(core)
            out.last.weight.copy_(last[:, :, None, None])
            if conv.bias is not None:
                out.last.bias.copy_(conv.bias)
        return out.to(conv.weight.device)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel this chain equals."""
        return torch.einsum("oa,abhw,bi->oihw", self.last.weight[:, :, 0, 0], self.core.weight,
                            self.first.weight[:, :, 0, 0])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, ranks={self.ranks}"


class CPConv2d(_FactoredConv):
    """CP-factored conv: ``1x1 (I -> r) -> kh x 1 depthwise -> 1 x kw depthwise -> 1x1 (r -> O)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int] | tuple[int, int], rank: int,
                 stride: list[int] | tuple[int, int] = (1, 1), padding: list[int] | tuple[int, int] = (0, 0),
                 dilation: list[int] | tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        kh, kw = kernel_size
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, int(rank)
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(stride[0], 1), padding=(padding[0], 0),
                                  dilation=(dilation[0], 1), groups=rank, bias=False)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), stride=(1, stride[1]), padding=(0, padding[1]),
                                    dilation=(1, dilation[1]), groups=rank, bias=False)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> CPConv2d:
        """CP (ALS) of ``conv``'s kernel with ``rank`` terms, bias kept as is."""
        out = cls(**conv_geometry(conv), rank=rank)
        first, vertical, horizontal, last = cp_factors(conv.weight.data, rank)
        with torch.no_grad():
            out.first.weight.copy_(first[:, :, None, None])
            out.vertical.weight.copy_(vertical[:, None, :, None])
            out.horizontal.weight.copy_(horizontal[:, None, None, :])
            out.last.weight.copy_(last[:, :, None, None])
            if conv.bias is not None:
                out.last.bias.copy_(conv.bias)
        return out.to(conv.weight.device)

    def factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel this chain equals (a sum of ``rank`` separable terms)."""
        return torch.einsum("or,rh,rw,ri->oihw", self.last.weight[:, :, 0, 0], self.vertical.weight[:, 0, :, 0],
                            self.horizontal.weight[:, 0, 0, :], self.first.weight[:, :, 0, 0])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"
