import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.primitives.masks import (
    global_sparsity_masks,
    keep_count,
    nm_mask,
    sparsity_mask,
    threshold_mask,
    topk_mask,
)

shapes = st.tuples(st.integers(1, 7), st.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, sparsity=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_sparsity_mask_keeps_exactly_the_largest(shape, sparsity, seed):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = sparsity_mask(scores, sparsity)
    k = keep_count(scores.numel(), sparsity)
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


def test_topk_ties_break_by_position():
    mask = topk_mask(torch.ones(6), 2)
    assert mask.tolist() == [True, True, False, False, False, False]


def test_threshold_mask_prunes_below_theta():
    w = torch.tensor([-0.3, 0.05, 0.2, -0.01])
    assert threshold_mask(w.abs(), 0.1).tolist() == [True, False, True, False]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), nm=st.sampled_from([(2, 4), (4, 8), (1, 4)]),
       seed=st.integers(0, 2**16))
def test_nm_mask_keeps_n_of_every_m(rows, groups, nm, seed):
    n, m = nm
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(scores, n, m)
    blocks, sblocks = mask.reshape(-1, m), scores.reshape(-1, m)
    assert torch.equal(blocks.sum(1), torch.full((blocks.shape[0],), n))
    for b, s in zip(blocks, sblocks, strict=True):
        assert s[b].min() >= s[~b].max() if n < m else True


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N <= M"):
        nm_mask(torch.randn(3, 8), 5, 4)


def test_global_masks_rank_across_tensors():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0])
    ma, mb = global_sparsity_masks([a, b], 4 / 7)
    assert ma.tolist() == [False, False, False, True] and mb.tolist() == [False, True, True]


def test_global_masks_never_cut_a_layer_out():
    """A layer of tiny weights keeps its best ceil(1%) entries; the total kept stays exact."""
    small, big = torch.rand(200) * 1e-3, torch.rand(1000) + 1.0
    ms, mb = global_sparsity_masks([small, big], 0.9)
    assert int(ms.sum()) == 2 and bool(ms[small.topk(2).indices].all())
    assert int(ms.sum() + mb.sum()) == keep_count(1200, 0.9)


def test_bad_sparsity_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sparsity_mask(torch.randn(4), 1.5)
