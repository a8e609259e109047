"""Packed weight-only execution: every kernel computes the dequantized reference, and no float copy
of the weight is kept (issue 12, finding 1: w4 MiniLM grew by as much RAM as fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.runtime import (
    PACKED_KERNELS,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    set_packed_kernel,
)

CASES = [(4, 64, False), (4, None, False), (3, 32, False), (2, 128, False), (8, None, False), (6, None, False),
         (8, 64, False), (1, None, True)]


def _float_tensors(obj, seen=None):
    """Every floating tensor reachable from a module's attributes (buffers, caches, kernel layouts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, nn.Module):
        yield from _float_tensors(vars(obj), seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _float_tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _float_tensors(value, seen)


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
@pytest.mark.parametrize(("bits", "group", "binary"), CASES)
def test_each_forced_kernel_equals_the_dequantized_reference(kernel, bits, group, binary, monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_PACKED_KERNEL", kernel)
    torch.manual_seed(bits)
    q = PackedIntLinear.from_float(nn.Linear(256, 96), bits, group, binary=binary)
    expected = kernel if q.kernel_support()[kernel] is None else "dequant"  # the named fallback
    for x in (torch.randn(1, 256), torch.randn(3, 50, 256)):
        assert q.kernel(x.reshape(-1, 256)) == expected
        ref = nn.functional.linear(x, q.dequantized_rows(), q.bias)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    held = [t for t in _float_tensors(q) if t.numel() >= 96 * 256]
    assert len(held) == (kernel == "float")  # only the kernel named for keeping the decoded weight keeps it


def test_kernel_support_names_why_a_kernel_cannot_run():
    assert {k: v for k, v in PackedIntLinear(256, 16, bits=4, group_size=64).kernel_support().items()
            if k != "gemv"} == {
        "int4pack": None, "int8pack": "the int8 kernel takes one scale per output channel, not groups",
        "dequant": None, "float": None}
    assert "4- and 8-bit" in PackedIntLinear(256, 16, bits=3, group_size=64).kernel_support()["gemv"]
    assert "whole blocks of 32" in PackedIntLinear(96, 16, bits=4, group_size=48).kernel_support()["gemv"]
    support = PackedIntLinear(96, 8, bits=8, group_size=48).kernel_support()
    assert "8-bit codes" in support["int4pack"] and support["int8pack"] and support["dequant"] is None
    assert "divisor" in PackedIntLinear(40, 16, bits=4).kernel_support()["int4pack"]
    assert "blocks of 16" in PackedIntLinear(64, 8, bits=4).kernel_support()["int4pack"]


def test_measured_choice_keeps_no_float_weight_and_matches_reference():
    """The default path (kernels raced per batch kind) never holds a float (out, in) weight."""
    torch.manual_seed(0)
    q = PackedIntLinear.from_float(nn.Linear(384, 192), 4, 64)
    for rows in (1, 7, 300, 700):
        x = torch.randn(rows, 384)
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantized_rows(), q.bias), rtol=1e-5, atol=1e-5)
    assert set(q.kernels()) == {"few", "many", "large"} and set(q.kernels().values()) <= set(PACKED_KERNELS)
    assert not [t for t in _float_tensors(q) if t.numel() >= 384 * 192]
    layouts = {k for k in ("gemv", "int4pack", "int8pack") if k in q._cache}
    assert layouts == set(q.kernels().values()) - {"dequant"}  # layouts of kernels not chosen are dropped


def test_gradients_flow_through_the_dequant_path():
    q = PackedIntLinear.from_float(nn.Linear(64, 8), 4, 32)
    x = torch.randn(4, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantized_rows().sum(0).expand(4, 64))


def test_conv_and_embedding_keep_no_float_table():
    conv = PackedIntConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), 4)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.dequantized_weight(), conv.bias, padding=1))
    assert not [t for t in _float_tensors(conv) if t.numel() >= 16 * 8 * 9]
    emb = PackedIntEmbedding.from_float(nn.Embedding(500, 64), 4, 32)
    ids = torch.tensor([[3, 499, 0]])
    torch.testing.assert_close(emb(ids), emb.dequantized_weight()[ids])
    assert not [t for t in _float_tensors(emb) if t.numel() >= 500 * 64]


def test_unknown_packed_kernel_is_a_clear_error(monkeypatch):
    with pytest.raises(ModelError, match="unknown packed kernel"):
        set_packed_kernel("marlin")
    monkeypatch.setenv("DEEPSQUEEZE_PACKED_KERNEL", "marlin")
    with pytest.raises(ModelError, match="DEEPSQUEEZE_PACKED_KERNEL='marlin'"):
        PackedIntLinear(64, 8)(torch.randn(2, 64))


def _gemv_expected() -> bool:
    """The kernel must build wherever a C++ compiler and an AVX2 CPU are there (as on CI; ninja is a dependency)."""
    import shutil

    return bool((shutil.which("c++") or shutil.which("g++"))
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.mark.parametrize(("bits", "group", "symmetric", "float_zero"), [
    (4, 32, True, False), (4, 64, False, False), (4, 96, False, True), (4, None, False, False),
    (8, 32, True, False), (8, 64, False, True), (8, None, False, False)])
def test_the_gemv_kernel_reads_the_stored_codes_exactly(bits, group, symmetric, float_zero):
    from deepsqueeze.runtime.gemv import gemv_unavailable

    reason = gemv_unavailable()
    if reason is not None:
        assert not _gemv_expected(), reason
        pytest.skip(reason)
    torch.manual_seed(bits)
    for outputs in (80, 83):  # one input row takes outputs four at a time: 83 leaves a remainder
        q = PackedIntLinear.from_float(nn.Linear(192, outputs), bits, group, symmetric, float_zero=float_zero)
        for rows in (1, 5, 32, 45):
            x = torch.randn(rows, 192)
            ref = nn.functional.linear(x, q.dequantized_rows(), q.bias)
            torch.testing.assert_close(q._run("gemv", x), ref, rtol=1e-4, atol=1e-4)


def _two_level_ternary() -> nn.Module:
    from deepsqueeze.runtime import PackedTernaryLinear

    layer, g = PackedTernaryLinear(256, 96), torch.Generator().manual_seed(0)
    layer.set_levels(torch.randint(-1, 2, (96, 256), generator=g), torch.rand(96, 1, generator=g) + 0.5,
                     torch.rand(96, 1, generator=g) * 0.1 + 0.01)
    return layer


@pytest.mark.parametrize("kernel", [None, *PACKED_KERNELS])
def test_codes_decoded_otherwise_than_affinely_run_only_where_a_kernel_reads_them_so(kernel, monkeypatch):
    """Two-level ternary layers (TTQ: ``-neg_scale / 0 / +scale``) ran the int4pack kernel as ``(q - 1) * scale``:
    every negative weight took the positive level (the output was another model's). A subclass that decodes its
    codes in its own ``dequantized_rows`` runs only the kernel that calls it, raced or forced."""
    if kernel is not None:
        monkeypatch.setenv("DEEPSQUEEZE_PACKED_KERNEL", kernel)
    layer = _two_level_ternary()
    assert not layer.affine_codes
    assert {k for k, why in layer.kernel_support().items() if why is None} == {"dequant", "float"}
    for x in (torch.randn(1, 256), torch.randn(40, 256)):
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dequantized_rows(), layer.bias),
                                   rtol=1e-5, atol=1e-5)


def test_gguf_never_carries_two_level_ternary_codes_as_affine_blocks():
    from deepsqueeze.runtime import gguf_form

    layer = _two_level_ternary()
    form = gguf_form(layer)
    assert form.type in ("F16", "F32") and "decoded" in form.note, form.note
