"""``zero_point: float``: codes that span each group's exact min..max (llama.cpp's Q4_1, HQQ), in every weight-only
method, every packed kernel, the artifact and the ONNX forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.quant import PackedIntLinear, QuantizeConfig, quantize_
from deepsqueeze.runtime import set_packed_kernel
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle


def _q4_1_weight(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight already on a Q4_1 grid: per block of 32, ``m + d * q`` with q in 0..15 using both ends."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    d = torch.rand(rows, cols // 32, 1, generator=g) * 0.02 + 0.001
    m = torch.randn(rows, cols // 32, 1, generator=g) * 0.05
    return (m + d * q).reshape(rows, cols)


def test_a_q4_1_weight_is_reproduced_exactly_only_with_float_zero_points():
    linear = nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_q4_1_weight())
    exact = PackedIntLinear.from_float(linear, 4, 32, symmetric=False, float_zero=True)
    integer = PackedIntLinear.from_float(linear, 4, 32, symmetric=False)
    assert exact.float_zero and exact.zero_point.dtype == torch.float32
    assert torch.allclose(exact.dequantized_weight(), linear.weight, atol=1e-6)
    assert (integer.dequantized_weight() - linear.weight).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_weight_only_method_packs_float_zero_points_that_round_trip(method, tmp_path):
    model, data = tiny_model_handle(), tiny_classification_data()
    batches = [x for x, _ in data.batches("train", 64, limit=128)] if method != "rtn" else None
    quantize_(model.module, QuantizeConfig(method=method, bits=3, group_size=16, symmetric=False,
                                           zero_point="float"), batches)
    layers = [m for m in model.module.modules() if isinstance(m, PackedIntLinear)]
    assert layers and all(m.float_zero for m in layers)
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    x = data.test_x[:32]
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model.module(x))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (7, None), (8, None), (3, None)])
def test_every_kernel_computes_the_dequantized_product(bits, group):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = PackedIntLinear.from_float(linear, bits, group, symmetric=False, float_zero=True)
    x = torch.randn(5, 64)
    want = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    try:
        for kernel, support in layer.kernel_support().items():
            if support is not None:
                continue
            set_packed_kernel(kernel)
            layer._kernels.clear()
            assert torch.allclose(layer(x), want, atol=2e-3, rtol=1e-3), kernel
    finally:
        set_packed_kernel(None)


def test_float_zero_points_are_for_asymmetric_weight_only_codes():
    with pytest.raises(ValueError, match="asymmetric weight-only"):
        QuantizeConfig(method="rtn", bits=4, symmetric=True, zero_point="float")
    with pytest.raises(ValueError, match="asymmetric weight-only"):
        QuantizeConfig(method="dynamic", zero_point="float")
