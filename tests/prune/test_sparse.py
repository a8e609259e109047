import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.encoding import get_encoding
from deepsqueeze.errors import ArtifactError
from deepsqueeze.eval import accuracy
from deepsqueeze.prune import PruneConfig, SparseCSRLinear, prune_, to_sparse_execution
from deepsqueeze.prune.sparse import sparse_layout_bytes
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle


def _sparse(shape, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return w * (torch.rand(shape, generator=g) >= sparsity)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), sparsity=st.floats(0, 1), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_sparse_encoding_round_trips_exactly(rows, cols, sparsity, seed, dtype):
    enc = get_encoding("sparse")
    w = _sparse((rows, cols), sparsity, seed, dtype)
    meta, segments = enc.encode(w)
    back = enc.decode(meta, segments, tuple(w.shape), w.dtype)
    assert torch.equal(back, w)
    nnz = int((w != 0).sum())
    payload = sum(len(s) for s in segments)
    assert payload == min(sparse_layout_bytes(rows, cols, nnz, w.element_size()).values())


def test_sparse_encoding_handles_conv_and_scalar_shapes():
    enc = get_encoding("sparse")
    for w in (_sparse((8, 3, 3, 3), 0.7), torch.tensor(0.0), torch.tensor(2.5), torch.zeros(0, 4)):
        meta, segments = enc.encode(w)
        assert torch.equal(enc.decode(meta, segments, tuple(w.shape), w.dtype), w)


def test_ninety_percent_sparse_takes_about_a_tenth_plus_indices():
    w = _sparse((1536, 384), 0.9)
    meta, segments = get_encoding("sparse").encode(w)
    dense = w.numel() * 4
    payload = sum(len(s) for s in segments)
    # values: ~10% of dense; bitmap: 1 bit per weight = 1/32 of dense
    assert payload < 0.10 * dense * 1.05 + dense / 32 + 64
    assert meta["layout"] == "bitmap"
    w99 = _sparse((1536, 384), 0.99)
    meta, segments = get_encoding("sparse").encode(w99)
    assert meta["layout"] == "csr" and sum(len(s) for s in segments) < 0.02 * dense


def test_corrupt_sparse_payload_is_an_artifact_error():
    enc = get_encoding("sparse")
    w = _sparse((16, 16), 0.5)
    meta, segments = enc.encode(w)
    with pytest.raises(ArtifactError, match="corrupt"):
        enc.decode(meta, [segments[0][:-4], segments[1]], (16, 16), torch.float32)
    with pytest.raises(ArtifactError, match="layout"):
        enc.decode({**meta, "layout": "coo"}, segments, (16, 16), torch.float32)


def test_to_sparse_execution_respects_the_break_even():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.95)
        model[2].weight.mul_(torch.rand_like(model[2].weight) > 0.3)
    assert to_sparse_execution(model, 0.85) == ["0"]
    assert isinstance(model[0], SparseCSRLinear) and isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("execution", ["dense", "sparse_csr"])
def test_pruned_model_round_trips_through_the_artifact(tmp_path, execution):
    model, data = tiny_model_handle(), tiny_classification_data()
    ctx = StageContext(model, data=data, progress=False)
    prune_(model, PruneConfig(sparsity=0.9, schedule="agp", epochs=2, lr=1e-2, execution=execution), ctx)
    dense_copy = tiny_model_handle()
    size = save(model, tmp_path / "p.dsq")
    dense_size = save(dense_copy, tmp_path / "d.dsq")
    assert size < 0.5 * dense_size  # tiny layers: header, py fingerprint and biases dominate; weights ~1/7 of dense
    loaded = load(tmp_path / "p.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    assert type(loaded.module.fc1) is type(model.module.fc1)
    for (k, a), (k2, b) in zip(model.module.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert accuracy(loaded.module, data) == accuracy(model.module, data)
    x = data.test_x[:32]
    assert torch.equal(loaded.module(x), model.module(x))
    # deterministic: the same pruning from the same start writes the same bytes
    again = tiny_model_handle()
    prune_(again, PruneConfig(sparsity=0.9, schedule="agp", epochs=2, lr=1e-2, execution=execution),
           StageContext(again, data=data, progress=False))
    save(again, tmp_path / "again.dsq")
    assert (tmp_path / "again.dsq").read_bytes() == (tmp_path / "p.dsq").read_bytes()
