"""Affine, power-of-two, binary and ternary quantizers: error bounds, SQNR, degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.errors import ModelError
from deepsqueeze.primitives.quantize import (
    PerChannel,
    PerGroup,
    PerTensor,
    Rounding,
    binarize,
    choose_qparams,
    dequantize,
    dequantize_per_channel,
    dequantize_pow2,
    fake_quantize,
    qrange,
    quantize,
    quantize_pow2,
    sqnr_db,
    ternarize,
)

BITS = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16])
GRANS = st.sampled_from([PerTensor(), PerChannel(0), PerChannel(1), PerGroup(4)])


def _tensor(seed: int, scale: float, shape=(6, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), bits=BITS, symmetric=st.booleans(),
       signed=st.booleans(), gran=GRANS)
def test_round_trip_error_is_at_most_half_a_step(seed, scale, bits, symmetric, signed, gran):
    x = _tensor(seed, scale)
    qp = choose_qparams(x, bits, symmetric, signed, gran)
    q = quantize(x, qp)
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    err = (dequantize(q, qp) - x).abs()
    step = qp.scale if isinstance(gran, PerTensor) else None
    if isinstance(gran, PerChannel):
        view = [1, 1]
        view[gran.axis] = -1
        step = qp.scale.reshape(view)
    elif isinstance(gran, PerGroup):
        step = qp.scale.repeat_interleave(gran.size, -1)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6 * scale).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), bits=BITS, symmetric=st.booleans(), signed=st.booleans())
def test_zero_is_exact(seed, bits, symmetric, signed):
    x = _tensor(seed, 1.0)
    x[0, 0] = 0.0
    qp = choose_qparams(x, bits, symmetric, signed, PerChannel(0))
    assert float(dequantize(quantize(x, qp), qp)[0, 0]) == 0.0


def test_int8_sqnr_and_more_bits_is_better():
    x = _tensor(0, 1.0, (64, 256))
    by_bits = [sqnr_db(x, fake_quantize(x, b, granularity=PerChannel(0))) for b in (2, 4, 8, 16)]
    assert by_bits == sorted(by_bits)
    assert by_bits[2] > 38  # ~6 dB per bit
    assert by_bits[3] > 85
    g = sqnr_db(x, fake_quantize(x, 4, symmetric=False, granularity=PerGroup(32)))
    t = sqnr_db(x, fake_quantize(x, 4, symmetric=False, granularity=PerTensor()))
    assert g > t + 2


def test_symmetric_signed_8bit_uses_127_and_zero_point_0():
    x = torch.tensor([-2.0, 0.5, 1.0])
    qp = choose_qparams(x, 8, symmetric=True, signed=True)
    assert torch.equal(quantize(x, qp), torch.tensor([-127, 32, 64], dtype=torch.int8))
    assert int(qp.zero_point) == 0
    qu = choose_qparams(x, 8, symmetric=True, signed=False)
    assert int(qu.zero_point) == 128 and quantize(x, qu).dtype == torch.uint8


def test_asymmetric_positive_range_uses_full_codes():
    x = torch.linspace(0, 5, 100)
    qp = choose_qparams(x, 8, symmetric=False, signed=False)
    q = quantize(x, qp)
    assert int(q.min()) == 0 and int(q.max()) == 255 and int(qp.zero_point) == 0


def test_rounding_modes():
    qp = choose_qparams(torch.tensor([-1.0, 1.0]), 8)
    x = torch.full((20000,), 0.3) * float(qp.scale)  # 0.3 of a step
    assert int(quantize(x, qp, Rounding.NEAREST).max()) == 0
    assert int(quantize(-x, qp, Rounding.FLOOR).min()) == -1
    g = torch.Generator().manual_seed(0)
    mean = quantize(x, qp, "stochastic", generator=g).float().mean()
    assert abs(float(mean) - 0.3) < 0.02  # unbiased in expectation


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerGroup(4)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_tensors_round_trip_exactly(gran, symmetric):
    for x in (torch.zeros(3, 8), torch.full((3, 8), 2.5), torch.full((3, 8), -0.125)):
        qp = choose_qparams(x, 4, symmetric, True, gran)
        assert bool(torch.isfinite(qp.scale).all()) and bool((qp.scale > 0).all())
        torch.testing.assert_close(dequantize(quantize(x, qp), qp), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    x = torch.ones(4)
    x[1] = bad
    with pytest.raises(ModelError, match="NaN or Inf"):
        choose_qparams(x)
    with pytest.raises(ModelError, match="NaN or Inf"):
        binarize(x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        qrange(1, True)
    with pytest.raises(ValueError, match="multiple of 5"):
        choose_qparams(torch.ones(2, 8), granularity=PerGroup(5))
    with pytest.raises(ValueError):
        PerGroup(0)
    with pytest.raises(ValueError, match="empty"):
        choose_qparams(torch.ones(0))


def test_16_bit_codes():
    x = _tensor(1, 3.0, (8, 8))
    qp = choose_qparams(x, 16, symmetric=False, signed=False)
    q = quantize(x, qp)
    assert q.dtype == torch.int32 and int(q.max()) <= 65535
    assert sqnr_db(x, dequantize(q, qp)) > 90


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8))
def test_pow2_levels_are_powers_of_two_and_log_error_bounded(seed, bits):
    x = _tensor(seed, 1.0, (4, 16))
    codes, scale = quantize_pow2(x, bits, PerChannel(0))
    y = dequantize_pow2(codes, scale, PerChannel(0))
    nz = y != 0
    ratio = y[nz].abs() / scale.reshape(-1, 1).expand_as(y)[nz]
    log = torch.log2(ratio)
    assert torch.equal(log, torch.round(log))  # exact powers of two
    n = (1 << (bits - 1)) - 1
    assert int(codes.abs().max()) <= n
    # inside the covered range, the log-domain error is at most half an octave
    smallest = scale.reshape(-1, 1) * 2.0 ** -(n - 1) * 2**-0.5
    covered = x.abs() >= smallest
    rel = (x[covered].abs() / y[covered].abs()).log2().abs()
    assert bool((rel <= 0.5 + 1e-6).all())
    assert bool((torch.sign(y[nz]) == torch.sign(x[nz])).all())


def test_pow2_zero_tensor():
    codes, scale = quantize_pow2(torch.zeros(3, 3), 4)
    assert torch.equal(dequantize_pow2(codes, scale), torch.zeros(3, 3))


def test_binarize_matches_xnor_definition():
    w = _tensor(3, 1.0, (5, 12))
    signs, alpha = binarize(w)
    assert set(signs.unique().tolist()) <= {-1, 1}
    torch.testing.assert_close(alpha, w.abs().mean(1))
    approx = dequantize_per_channel(signs, alpha)
    # alpha = mean|w| is the L2-optimal scale for sign(w): it beats any other per-channel scale
    for factor in (0.9, 1.1):
        assert (approx - w).pow(2).sum() < (approx * factor - w).pow(2).sum()


def test_ternarize_threshold_and_scale():
    w = torch.tensor([[0.1, -0.2, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    codes, alpha = ternarize(w)
    delta = 0.7 * w[0].abs().mean()  # 0.7 * 1.075 = 0.7525
    assert codes[0].tolist() == [0, 0, 1, -1] and float(delta) < 1.0
    assert math.isclose(float(alpha[0]), 2.0, rel_tol=1e-6)
    assert codes[1].tolist() == [0, 0, 0, 0] and float(alpha[1]) == 0.0
    w2 = _tensor(4, 1.0, (8, 64))
    c2, a2 = ternarize(w2)
    assert sqnr_db(w2, dequantize_per_channel(c2, a2)) > sqnr_db(w2, dequantize_per_channel(*binarize(w2)))
