"""Observers: each one's statistic on streams with a known answer."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.errors import ModelError
from deepsqueeze.primitives.observers import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from deepsqueeze.primitives.quantize import PerChannel, dequantize, quantize


def _heavy_tailed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:5] = 60.0  # a few huge outliers
    return x


def test_minmax_tracks_extremes_over_batches_and_channels():
    obs = MinMaxObserver()
    obs.update(torch.tensor([-1.0, 2.0]))
    obs.update(torch.tensor([-3.0, 0.5]))
    lo, hi = obs.range()
    assert float(lo) == -3.0 and float(hi) == 2.0
    pc = MinMaxObserver(PerChannel(1))
    pc.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]]))
    lo, hi = pc.range()
    assert lo.tolist() == [1.0, -2.0, 0.0] and hi.tolist() == [3.0, 1.0, 0.0]
    qp = pc.qparams(8)
    assert qp.scale.shape == (3,) and float(qp.scale[2]) == 1.0  # all-zero channel: defined scale


def test_moving_average_damps_an_outlier_batch():
    obs = MovingAverageMinMaxObserver(momentum=0.1)
    for _ in range(5):
        obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-100.0, 100.0]))
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(0.9 + 10.0) and float(lo) == pytest.approx(-10.9)


def test_percentile_ignores_rare_outliers():
    obs = PercentileObserver(99.9)
    obs.update(_heavy_tailed(50_000))
    lo, hi = obs.range()
    assert 3.0 < float(hi) < 3.6 and float(lo) == -float(hi)  # |N(0,1)| 99.9th percentile is 3.29


@pytest.mark.parametrize("name,bits", [("mse", 4), ("entropy", 8)])
def test_mse_and_entropy_clip_outliers_and_reduce_error(name, bits):
    x = _heavy_tailed(50_000)
    errs = {}
    for which in ("minmax", name):
        obs = make_observer(which, bits=bits)
        for chunk in x.chunk(4):
            obs.update(chunk)
        qp = obs.qparams(bits)
        errs[which] = float((dequantize(quantize(x, qp), qp) - x).pow(2).mean())
    assert float(obs.range()[1]) < 30  # clipped well below the 60.0 outliers
    if name == "mse":  # MSE is what it minimises, outliers included
        assert errs["mse"] < errs["minmax"] / 2


def test_entropy_on_uniform_data_keeps_most_of_the_range():
    obs = EntropyObserver(8)
    obs.update(torch.linspace(-1, 1, 100_001))
    assert float(obs.range()[1]) > 0.9


def test_sampling_is_deterministic_and_bounded():
    a, b = MSEObserver(4, max_samples=1000), MSEObserver(4, max_samples=1000)
    for obs in (a, b):
        for seed in range(5):
            obs.update(_heavy_tailed(3000, seed))
    assert a.sample().numel() <= 2000
    assert torch.equal(a.range()[1], b.range()[1])


def test_errors():
    with pytest.raises(ValueError, match="seen no data"):
        MinMaxObserver().qparams()
    with pytest.raises(ModelError, match="NaN"):
        MinMaxObserver().update(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kl")
    with pytest.raises(ValueError, match="per-tensor only"):
        make_observer("mse", granularity=PerChannel(0))
    with pytest.raises(ValueError):
        PercentileObserver(10)
    z = EntropyObserver()
    z.update(torch.zeros(10))
    assert float(z.qparams().scale) == 1.0
