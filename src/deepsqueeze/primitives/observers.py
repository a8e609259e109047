"""Observers: collect statistics of a tensor stream, then turn them into a quantization range.

Collection (``update``) is separate from applying the result (``range()`` / ``qparams()``), so one
calibration pass can feed several algorithms, and the same statistics can be reused at different
bit widths. Every observer returns ``(min, max)`` in the canonical shape of its granularity; the
quantizer (``qparams_from_range``) widens it to include zero.

* :class:`MinMaxObserver`: running min and max (per tensor or per channel).
* :class:`MovingAverageMinMaxObserver`: exponential moving average of per-batch min/max (robust to
  one outlier batch).
* :class:`PercentileObserver`: the ``p``-th percentile of ``|x|`` (or of ``x`` on each side).
* :class:`MSEObserver`: the clipping range minimising the mean squared quantization error.
* :class:`EntropyObserver`: TensorRT's calibration: the threshold minimising the KL divergence
  between the clipped histogram of ``|x|`` and its quantized version.

The last three keep a bounded, seeded random sample of the observed values (deterministic).
"""

from __future__ import annotations

import torch

from deepsqueeze.primitives.quantize import (
    Granularity,
    PerChannel,
    PerTensor,
    QParams,
    _reduce_minmax,
    check_finite,
    qparams_from_range,
    qrange,
)

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]


class Observer:
    """Base: ``update(x)`` any number of times, then ``range()`` or ``qparams(bits, ...)``."""

    granularity: Granularity = PerTensor()

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def seen(self) -> int:
        return getattr(self, "_seen", 0)

    def qparams(self, bits: int = 8, symmetric: bool = True, signed: bool = True) -> QParams:
        if self.seen == 0:
            raise ValueError(f"{type(self).__name__} has seen no data: run calibration batches through the model first")
        lo, hi = self.range()
        return qparams_from_range(lo, hi, bits, symmetric, signed, self.granularity)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        check_finite(x, "observed activations")
        self._seen = self.seen + 1
        return x


class MinMaxObserver(Observer):
    """Running min and max over everything observed."""

    def __init__(self, granularity: Granularity = PerTensor()) -> None:
        self.granularity = granularity
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _reduce_minmax(self._prepare(x), self.granularity)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``range <- (1 - momentum) * range + momentum * batch_range`` (the first batch initialises it)."""

    def __init__(self, momentum: float = 0.1, granularity: Granularity = PerTensor()) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        super().__init__(granularity)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = _reduce_minmax(self._prepare(x), self.granularity)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = (1 - m) * self.min_val + m * lo
            self.max_val = (1 - m) * self.max_val + m * hi


class _SamplingObserver(Observer):
    """Keeps the exact min/max plus a seeded random sample of at most ``max_samples`` values."""

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0) -> None:
        self.granularity = PerTensor()
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list[torch.Tensor] = []
        self._count = 0
        self.min_val = torch.tensor(float("inf"))
        self.max_val = torch.tensor(-float("inf"))

    def update(self, x: torch.Tensor) -> None:
        flat = self._prepare(x).reshape(-1)
        if flat.numel() == 0:
            return
        self.min_val = torch.minimum(self.min_val, flat.min())
        self.max_val = torch.maximum(self.max_val, flat.max())
        if flat.numel() > self.max_samples:
            flat = flat[torch.randperm(flat.numel(), generator=self._gen)[: self.max_samples]]
        self._samples.append(flat)
        self._count += flat.numel()
        if self._count > 2 * self.max_samples:
            merged = torch.cat(self._samples)
            self._samples = [merged[torch.randperm(merged.numel(), generator=self._gen)[: self.max_samples]]]
            self._count = self.max_samples

    def sample(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(1)


class PercentileObserver(_SamplingObserver):
    """Clip at the ``percentile``-th percentile of ``|x|`` (symmetric) or of each tail (asymmetric)."""

    def __init__(self, percentile: float = 99.99, symmetric: bool = True, **kwargs: int) -> None:
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(**kwargs)
        self.percentile = percentile
        self.symmetric = symmetric

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample().double()
        q = self.percentile / 100
        if self.symmetric:
            t = torch.quantile(s.abs(), q).float()
            return -t, t
        return torch.quantile(s, 1 - q).float(), torch.quantile(s, q).float()


class MSEObserver(_SamplingObserver):
    """Search the clipping ratio ``r`` (range ``r * [min, max]``) that minimises the quantization MSE."""

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True, steps: int = 80,
                 **kwargs: int) -> None:
        super().__init__(**kwargs)
        qrange(bits, signed)
        self.bits, self.symmetric, self.signed, self.steps = bits, symmetric, signed, steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sample()
        best, best_err = 1.0, float("inf")
        for r in torch.linspace(1.0, 0.2, self.steps).tolist():
            lo, hi = self.min_val * r, self.max_val * r
            qp = qparams_from_range(lo, hi, self.bits, self.symmetric, self.signed)
            v = torch.clamp(torch.round(s / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
            err = float(((v - qp.zero_point) * qp.scale - s).pow(2).mean())
            if err < best_err:
                best, best_err = r, err
        return self.min_val * best, self.max_val * best


class EntropyObserver(_SamplingObserver):
    """TensorRT-style entropy calibration on a ``bins``-bin histogram of ``|x|`` (symmetric range)."""

    def __init__(self, bits: int = 8, bins: int = 2048, stride: int = 8, **kwargs: int) -> None:
        super().__init__(**kwargs)
        qrange(bits, True)
        self.levels = 1 << (bits - 1)
        if bins < self.levels:
            raise ValueError(f"bins ({bins}) must be at least the number of levels ({self.levels})")
        self.bins, self.stride = bins, stride

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.sample().abs().double()
        amax = float(a.max())
        if amax == 0:
            return torch.tensor(0.0), torch.tensor(0.0)
        hist = torch.histc(a, self.bins, 0, amax)
        width = amax / self.bins
        best_i, best_kl = self.bins, float("inf")
        for i in range(self.levels, self.bins + 1, self.stride):
            kl = _clipped_kl(hist, i, self.levels)
            if kl < best_kl:
                best_i, best_kl = i, kl
        t = torch.tensor(best_i * width, dtype=torch.float32)
        return -t, t


def _clipped_kl(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(P || Q): P = first ``i`` bins with the outliers folded into the last; Q = P merged into
    ``levels`` bins and spread back uniformly over each one's non-empty source bins."""
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    edges = torch.linspace(0, i, levels + 1).floor().long()
    idx = torch.bucketize(torch.arange(i), edges[1:-1], right=True)
    nonzero = (hist[:i] > 0).double()
    mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
    count = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, nonzero)
    q = torch.where(nonzero > 0, mass[idx] / count[idx].clamp_min(1), torch.zeros_like(p))
    p = p / p.sum()
    q_sum = q.sum()
    if q_sum == 0:
        return float("inf")
    q = q / q_sum
    mask = p > 0
    q = torch.where(mask & (q == 0), torch.full_like(q, 1e-12), q)
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, bits: int = 8, symmetric: bool = True, signed: bool = True,
                  granularity: Granularity = PerTensor(), percentile: float = 99.99) -> Observer:
    """An observer by its recipe name (``minmax``, ``moving_average``, ``percentile``, ``mse``, ``entropy``)."""
    if name == "minmax":
        return MinMaxObserver(granularity)
    if name == "moving_average":
        return MovingAverageMinMaxObserver(granularity=granularity)
    if isinstance(granularity, PerChannel):
        raise ValueError(f"observer {name!r} is per-tensor only; use minmax or moving_average per channel")
    if name == "percentile":
        return PercentileObserver(percentile, symmetric)
    if name == "mse":
        return MSEObserver(bits, symmetric, signed)
    if name == "entropy":
        return EntropyObserver(bits)
    raise ValueError(f"unknown observer {name!r}: choose one of {', '.join(OBSERVERS)}")
