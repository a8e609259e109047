"""Lean loading (issue 12, finding 2): ``load`` never writes a full-size float copy of the base model's
weights before swapping in the compressed representation, and the loaded model equals the saved one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deepsqueeze.artifact import load, save
from deepsqueeze.core.materialize import meta_tensors, skeleton
from deepsqueeze.quant import QuantizeConfig, quantize_
from deepsqueeze.resolve import resolve_model


class _FloatWrites(TorchDispatchMode):
    """Records every op that writes a real (non-meta) float tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.writes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in ("empty", "empty_strided", "detach", "alias", "view", "_to_copy") or name.endswith("_"):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
                        and t.numel() >= self.numel):
                    self.writes.append((name, tuple(t.shape)))
        return out


@pytest.fixture
def w4_lenet(tmp_path):
    model = resolve_model("zoo:lenet300", progress=False)
    quantize_(model.module, QuantizeConfig(method="rtn", bits=4, group_size=64))
    path = tmp_path / "w4.dsq"
    save(model, path)
    return model, path


def test_load_writes_no_full_size_float_weight(w4_lenet, monkeypatch):
    import deepsqueeze.artifact as artifact

    model, path = w4_lenet
    probes = []  # the probe forward pass dequantizes per call, like any forward: counted apart
    monkeypatch.setattr(artifact, "probe_forward", lambda *args: probes.append(args))
    with _FloatWrites(numel=20_000) as spy:  # fc1 alone is 300 x 784 = 235,200 floats
        loaded = load(path)
    assert spy.writes == []  # today: uniform_ (init) and copy_ (load) on every fp32 Linear weight
    assert len(probes) == 1
    assert meta_tensors(loaded.module) == []
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.module(x), rtol=1e-5, atol=1e-5)


def test_skeleton_keeps_non_persistent_buffers_real():
    class WithPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.register_buffer("positions", torch.arange(8), persistent=False)
            self.register_buffer("stat", torch.ones(8))

    with skeleton():
        m = WithPositions()
    assert m.linear.weight.is_meta and m.stat.is_meta
    assert torch.equal(m.positions, torch.arange(8))
    assert sorted(meta_tensors(m)) == ["linear.bias", "linear.weight", "stat"]
    assert not nn.Linear(2, 2).weight.is_meta  # outside the block nothing changes
