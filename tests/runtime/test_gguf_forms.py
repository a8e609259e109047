"""Each representation's GGUF tensor decodes (with gguf's reference dequantizers, llama.cpp's layouts) to the weight
the torch layer computes with: codes carried over, only the scales and offsets rounded to fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepsqueeze.runtime import Int8Linear, PackedIntEmbedding, PackedIntLinear
from deepsqueeze.runtime.gguf_forms import gguf_form

gguf = pytest.importorskip("gguf")


def _decoded(form) -> torch.Tensor:
    kind = getattr(gguf.GGMLQuantizationType, form.type)
    if form.type in ("F32", "F16"):
        return torch.from_numpy(np.asarray(form.data, dtype=np.float32))
    return torch.from_numpy(gguf.quants.dequantize(form.data, kind).astype(np.float32)).reshape(form.shape)


def _linear(rows: int = 48, cols: int = 192, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.mul_(3).add_(0.05)
    return layer


def _fp16_close(form, expected: torch.Tensor) -> None:
    decoded = _decoded(form)
    # codes equal, scale / offset rounded to fp16: an error of at most ~2^-11 of the group's range per weight
    scale = expected.abs().amax(dim=1, keepdim=True)
    assert ((decoded - expected).abs() <= scale * 2e-3 + 1e-7).all()


@pytest.mark.parametrize("bits,symmetric,float_zero,group,kind", [
    (4, True, False, 32, "Q4_0"), (4, False, False, 64, "Q4_1"), (4, False, True, 96, "Q4_1"),
    (3, False, False, 32, "Q4_1"), (2, True, False, None, "Q4_0"), (3, False, True, 32, "Q4_1"),
    (5, True, False, 32, "Q5_0"), (5, False, True, 64, "Q5_1"), (8, True, False, 32, "Q8_0"),
    (6, False, False, 32, "Q8_0"), (7, True, False, 96, "Q8_0"),
])
def test_packed_codes_are_carried_over_onto_the_block_type_that_holds_them(bits, symmetric, float_zero, group, kind):
    layer = PackedIntLinear.from_float(_linear(), bits, group, symmetric, float_zero=float_zero)
    form = gguf_form(layer)
    assert form.type == kind and form.exact and form.shape == (48, 192)
    _fp16_close(form, layer.dequantized_weight())


def test_rows_are_taken_in_the_order_asked():
    layer = PackedIntLinear.from_float(_linear(), 4, 32, False)
    rows = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    _fp16_close(gguf_form(layer, rows), layer.dequantized_weight()[rows])


def test_embeddings_int8_layers_and_float_layers():
    table = nn.Embedding(40, 64)
    packed = PackedIntEmbedding.from_float(table, 4, 32, symmetric=False, float_zero=True)
    form = gguf_form(packed)
    assert form.type == "Q4_1"
    _fp16_close(form, packed.dequantized_weight())
    int8 = Int8Linear.from_float(_linear(cols=64))
    form = gguf_form(int8)
    assert form.type == "Q8_0" and form.exact
    _fp16_close(form, int8.dequantized_weight())
    plain = _linear()
    form = gguf_form(plain)
    assert form.type == "F32" and torch.equal(_decoded(form), plain.weight.detach())


@pytest.mark.parametrize("build,why", [
    (lambda: PackedIntLinear.from_float(_linear(), 4, 48, False), "not whole blocks"),
    (lambda: PackedIntLinear.from_float(_linear(), 8, 32, False, float_zero=True), "no GGUF type"),
    (lambda: PackedIntLinear.from_float(_linear(), 2, None, binary=True), "binary"),
])
def test_codes_no_gguf_type_holds_are_decoded_to_f16_and_say_so(build, why):
    layer = build()
    form = gguf_form(layer)
    assert form.type == "F16" and not form.exact and why in form.note
    assert torch.allclose(_decoded(form), layer.dequantized_weight(), rtol=1e-3, atol=1e-4)
