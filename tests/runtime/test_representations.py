"""Integer modules against fake-quant references, SQNR, degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.runtime import (
    FBGEMM_ACT_BITS,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    PackedInt4Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    int8_kernel,
    quantize_activation_per_token,
    set_int8_kernel,
)


def _linear(i: int = 64, o: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _fake_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return Q.fake_quantize(x, bits, symmetric=True, signed=True, granularity=Q.PerChannel(0))


KERNEL_BITS = {"int_mm": 8, "fbgemm": FBGEMM_ACT_BITS}


@pytest.fixture(params=list(KERNEL_BITS))
def kernel(request):
    """Run a test under each int8 kernel (forced), restoring the measured choice afterwards."""
    set_int8_kernel(request.param)
    yield request.param
    set_int8_kernel(None)


def test_int8_linear_per_token_equals_fake_quant_reference(kernel):
    lin = _linear()
    x = torch.randn(3, 5, 64) * 3
    q = Int8Linear.from_float(lin, "per_token")
    assert q.kernel(x.device) == kernel
    w_ref = Q.fake_quantize(lin.weight.detach(), 8, granularity=Q.PerChannel(0))
    x_ref = _fake_per_token(x.reshape(-1, 64), KERNEL_BITS[kernel])
    ref = nn.functional.linear(x_ref, w_ref, lin.bias.detach()).reshape(3, 5, 48)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert Q.sqnr_db(lin(x), q(x)) > (35 if kernel == "int_mm" else 29)
    assert q.weight.dtype == torch.int8


def test_int8_linear_integer_accumulation_is_exact(kernel):
    """Both kernels give the exact int32 sums of our codes (fbgemm: 7-bit codes, no u8s8 saturation)."""
    lin = _linear(32, 8)
    nn.init.uniform_(lin.weight, -1, 1)
    lin.weight.data[:, :4] = 1.0  # adjacent +-127 codes: the pairs that saturate int16 with 8-bit uint8 inputs
    q = Int8Linear.from_float(lin, "per_token")
    x = torch.randn(7, 32)
    x[:, :4] = 10.0
    xq, xs = quantize_activation_per_token(x, KERNEL_BITS[kernel])
    acc = xq.long() @ q.weight.long().T  # exact integer reference
    torch.testing.assert_close(q(x), acc.double().mul(xs.double() * q.weight_scale.double()).add(q.bias.double()).float(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ["per_tensor", "static"])
def test_int8_linear_uint8_activations_match_reference(act, kernel):
    """Static inputs are calibrated onto 7-bit codes (both kernels take them); per-tensor ones use 8."""
    lin = _linear()
    x = torch.randn(20, 64).abs() * 2 - 0.3  # asymmetric range
    qp = Q.choose_qparams(x, 7 if act == "static" else 8, symmetric=False, signed=False)
    q = Int8Linear.from_float(lin, act, input_qparams=(float(qp.scale), float(qp.zero_point)))
    x_ref = Q.dequantize(Q.quantize(x, qp), qp)
    w_ref = Q.fake_quantize(lin.weight.detach(), 8, granularity=Q.PerChannel(0))
    torch.testing.assert_close(q(x), nn.functional.linear(x_ref, w_ref, lin.bias.detach()), rtol=1e-4, atol=1e-4)


def test_int8_linear_smoothing_tames_outlier_channels():
    """Activations with a few huge channels: migrating them into the weights (SmoothQuant, alpha 0.5)
    keeps the function and beats plain per-token int8 by a wide margin."""
    lin = _linear()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g)
    x[:, :3] *= 60
    s = (x.abs().amax(0) / lin.weight.detach().abs().amax(0)).sqrt()
    smoothed = Int8Linear.from_float(lin, "per_token", smooth=s)
    plain = Int8Linear.from_float(lin, "per_token")
    torch.testing.assert_close(smoothed.dequantized_weight(), lin.weight.detach(), atol=0.02, rtol=0)
    assert Q.sqnr_db(lin(x), smoothed(x)) > Q.sqnr_db(lin(x), plain(x)) + 6


def test_fbgemm_kernel_matches_int_mm_on_the_same_codes():
    """fbgemm (per-token 7-bit) and _int_mm agree exactly on 7-bit codes, incl. a smoothed layer and 3-D input."""
    torch.manual_seed(1)
    lin = _linear(96, 40)
    q = Int8Linear.from_float(lin, "per_token", smooth=torch.rand(96) + 0.5)
    x = torch.randn(2, 9, 96) * 4
    set_int8_kernel("fbgemm")
    try:
        y = q(x)
        y_again = q(x)
    finally:
        set_int8_kernel(None)
    x2 = x.reshape(-1, 96) / q.smooth
    xq, xs = quantize_activation_per_token(x2, FBGEMM_ACT_BITS)
    assert int(xq.abs().max()) == 63
    ref = torch._int_mm(xq, q.weight.t()).double() * xs.double() * q.weight_scale.double() + q.bias.double()
    torch.testing.assert_close(y.reshape(-1, 40).double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, y_again)  # deterministic, packed once


def test_int8_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert int8_kernel(cpu) in ("int_mm", "fbgemm")  # measured once on this CPU
    monkeypatch.setenv("DEEPSQUEEZE_INT8_KERNEL", "int_mm")
    assert int8_kernel(cpu) == "int_mm"
    monkeypatch.setenv("DEEPSQUEEZE_INT8_KERNEL", "vnni")
    with pytest.raises(ModelError, match="DEEPSQUEEZE_INT8_KERNEL"):
        int8_kernel(cpu)
    with pytest.raises(ModelError, match="unknown int8 kernel"):
        set_int8_kernel("avx")
    assert Int8Linear(1, 4).kernel(cpu) == "int_mm"  # one input feature: no room for fbgemm's range row
    assert Int8Linear(8, 4, act="per_tensor").kernel(cpu) == "int_mm"


def test_int8_linear_degenerate_inputs(kernel):
    lin = nn.Linear(8, 4)
    nn.init.zeros_(lin.weight)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, 8)
    assert torch.equal(q(x), lin.bias.detach().expand(3, 4))
    assert torch.equal(Int8Linear.from_float(_linear(8, 4))(torch.zeros(2, 8)), _linear(8, 4).bias.detach().expand(2, 4))
    assert q(torch.zeros(0, 8)).shape == (0, 4)
    bad = _linear(8, 4)
    bad.weight.data[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        Int8Linear.from_float(bad)
    with pytest.raises(ModelError, match="calibrated"):
        Int8Linear.from_float(_linear(8, 4), "static")


def test_int8_conv2d_matches_requantized_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    qin = Q.choose_qparams(x, 7, symmetric=False, signed=False)  # x86 kernels take 7-bit inputs
    out = conv(x)
    qout = Q.choose_qparams(out, 8, symmetric=False, signed=False)
    for relu in (False, True):
        q = Int8Conv2d.from_float(conv, (float(qin.scale), float(qin.zero_point)),
                                  (float(qout.scale), float(qout.zero_point)), relu=relu)
        x_ref = Q.dequantize(Q.quantize(x, qin), qin)
        ref = nn.functional.conv2d(x_ref, q.dequantized_weight(), conv.bias, 2, 1)
        ref = Q.dequantize(Q.quantize(ref.clamp(min=0) if relu else ref, qout), qout)
        # the kernel requantizes its int32 sums: at most one output step apart from the float reference
        assert (q(x) - ref).abs().max() <= float(qout.scale) * 1.01
        assert Q.sqnr_db(out.clamp(min=0) if relu else out, q(x)) > 25


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (4, None), (8, 16)])
def test_packed_linear_equals_rtn_fake_quant(bits, group):
    lin = _linear(128, 24)
    q = PackedIntLinear.from_float(lin, bits, group)
    g = Q.PerGroup(group or 128)
    ref = Q.fake_quantize(lin.weight.detach(), bits, symmetric=False, signed=False, granularity=g)
    assert torch.equal(q.dequantized_weight(), ref)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, 128 * bits // 8)
    x = torch.randn(4, 128)
    torch.testing.assert_close(q(x), nn.functional.linear(x, ref, lin.bias.detach()))
    if bits == 4:
        assert Q.sqnr_db(lin.weight, q.dequantized_weight()) > 17


def test_packed_int4_linear_and_set_codes():
    q = PackedInt4Linear(16, 2, group_size=8, bias=False)
    codes = torch.arange(32).reshape(2, 16) % 16
    q.set_codes(codes, torch.full((2, 2), 0.5), torch.full((2, 2), 8))
    assert torch.equal(q.int_codes(), codes.to(torch.uint8))
    assert torch.equal(q.dequantized_weight(), (codes.float() - 8) * 0.5)
    with pytest.raises(ValueError):
        PackedInt4Linear(16, 2, bits=3)


def test_binary_and_ternary_codes():
    lin = _linear(16, 4)
    b = PackedIntLinear(16, 4, binary=True)
    b.quantize_weight(lin.weight)
    signs, scale = Q.binarize(lin.weight.detach())
    assert torch.equal(b.dequantized_weight(), signs.float() * scale[:, None])
    assert b.codes.shape == (4, 2)


def test_packed_conv_and_embeddings():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    q = PackedIntConv2d.from_float(conv, 4, 12)
    x = torch.randn(1, 4, 6, 6)
    assert Q.sqnr_db(conv(x), q(x)) > 15
    emb = nn.Embedding(50, 32)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    e8 = Int8Embedding.from_float(emb)
    assert torch.equal(e8(ids), e8.dequantized_weight()[ids])
    assert Q.sqnr_db(emb(ids), e8(ids)) > 35
    e4 = PackedIntEmbedding.from_float(emb, 4, 16)
    assert torch.equal(e4(ids), e4.dequantized_weight()[ids])
    assert Q.sqnr_db(emb(ids), e4(ids)) > 15
