"""GPTQ against exact references: the closed-form OBQ update, exhaustive search, and RTN."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.core.calibrate import HessianAccumulator
from deepsqueeze.errors import ModelError
from deepsqueeze.quant.gptq import affine_column_quantizer, gptq_quantize


def _correlated(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) @ torch.randn(d, d, generator=g, dtype=dtype)


def _obq_reference(W, H, quantizer, group, damp, act_order):
    """Greedy OBQ with explicit solves: quantize one column, then re-fit every remaining column."""
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(cols)
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    codes = torch.zeros(W.shape, dtype=torch.int32)
    params = {}
    for k in range(cols):
        c = int(order[k])
        g = c // group
        if g not in params:
            params[g] = quantizer.params(W[:, g * group : (g + 1) * group])
        s, z = params[g]
        q = quantizer.quantize(W[:, c], s, z)
        codes[:, c] = q.to(torch.int32)
        err = W[:, c] - quantizer.dequantize(q, s, z).double()
        rest = order[k + 1 :]
        if len(rest):
            W[:, rest] += err.unsqueeze(1) * torch.linalg.solve(H[rest][:, rest], H[rest, c]).unsqueeze(0)
    return codes


def _output_error(W, Wq, H):
    d = (W - Wq).double()
    return float(((d @ H.double()) * d).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_equals_closed_form_obq_updates(bits, act_order):
    X = _correlated(200, 8, seed=bits)
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    H = 2 * X.T @ X / len(X)
    quantizer = affine_column_quantizer(bits)
    # block_size 3 makes the lazy updates cross group (4) and block boundaries.
    result = gptq_quantize(W, H, quantizer, 4, act_order=act_order, damp=0.01, block_size=3)
    expected = _obq_reference(W, H, quantizer, 4, 0.01, act_order)
    assert torch.equal(result.codes, expected)


def test_gptq_is_between_exhaustive_optimum_and_rtn():
    """Per-channel 3 bits on 4x6 weights: the grid optimum (8^6 codes per row) bounds GPTQ from below,
    and over 8 correlated problems GPTQ's output error is well below round-to-nearest's."""
    quantizer = affine_column_quantizer(3)
    grid = torch.cartesian_prod(*[torch.arange(8)] * 6)
    total_opt = total_gptq = total_rtn = 0.0
    for seed in range(8):
        X = _correlated(256, 6, seed)
        W = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        H = 2 * X.T @ X / len(X)
        result = gptq_quantize(W, H, quantizer, None, damp=0.01)
        s, z = result.scale[:, :1], result.zero_point[:, :1]
        rtn = quantizer.dequantize(quantizer.quantize(W, s, z), s, z)
        opt = 0.0
        for row in range(4):
            e = W[row] - quantizer.dequantize(grid, s[row], z[row]).double()
            opt += float(((e @ H) * e).sum(1).min())
        gptq = _output_error(W, result.dequantize(quantizer.dequantize), H)
        assert opt <= gptq + 1e-9
        total_opt, total_gptq, total_rtn = total_opt + opt, total_gptq + gptq, total_rtn + _output_error(W, rtn, H)
    assert total_gptq < 0.8 * total_rtn
    assert total_opt <= total_gptq


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs_with_groups(act_order):
    torch.manual_seed(0)
    X = _correlated(1024, 128, seed=3, dtype=torch.float32) + 0.1 * torch.randn(1024, 128)
    W = torch.randn(64, 128) * 0.05
    acc = HessianAccumulator(128)
    for chunk in X.split(300):
        acc.add(chunk)
    quantizer = affine_column_quantizer(4)
    result = gptq_quantize(W, acc.hessian(), quantizer, 32, act_order=act_order)
    Wq = result.dequantize(quantizer.dequantize)
    from deepsqueeze.primitives.quantize import PerGroup, fake_quantize

    rtn = fake_quantize(W, 4, symmetric=False, signed=False, granularity=PerGroup(32))
    gptq_out = (X @ (W - Wq).T).pow(2).sum()
    rtn_out = (X @ (W - rtn).T).pow(2).sum()
    assert gptq_out < 0.5 * rtn_out
    assert result.codes.min() >= 0 and result.codes.max() <= 15
    assert result.scale.shape == (64, 4) and result.zero_point.shape == (64, 4)


def test_hessian_accumulator_is_mean_outer_product():
    X = torch.randn(3, 5, 7)
    acc = HessianAccumulator(7)
    acc.add(X[:1])
    acc.add(X[1:])
    flat = X.reshape(-1, 7).double()
    torch.testing.assert_close(acc.hessian(), 2 * flat.T @ flat / 15)
    with pytest.raises(ModelError, match="features"):
        acc.add(torch.randn(2, 6))
    with pytest.raises(ModelError, match="no calibration inputs"):
        HessianAccumulator(3).hessian()


def test_dead_inputs_and_bad_groups():
    W = torch.randn(3, 8)
    X = torch.randn(50, 8)
    X[:, 2] = 0  # an input that is always zero carries no information: its weights become exact zeros
    H = 2 * X.T @ X / 50
    quantizer = affine_column_quantizer(4)
    result = gptq_quantize(W, H, quantizer, 4)
    Wq = result.dequantize(quantizer.dequantize)
    assert torch.equal(Wq[:, 2], torch.zeros(3))
    assert torch.isfinite(Wq).all()
    with pytest.raises(ModelError, match="group size 3"):
        gptq_quantize(W, H, quantizer, 3)
    with pytest.raises(ModelError, match="does not fit"):
        gptq_quantize(W, H[:4, :4], quantizer, 4)
