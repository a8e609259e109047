"""SparseCSRLinear: the same outputs as the dense Linear with either kernel, dense keys in its state dict."""

import pytest
import torch
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.runtime import SparseCSRLinear, sparse_kernel


@pytest.mark.parametrize("kernel", ["csr", "dense", ""])  # "": raced on this machine
def test_sparse_csr_linear_matches_dense_linear(kernel, monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_SPARSE_KERNEL", kernel)
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.9)
    sparse = SparseCSRLinear.from_linear(linear)
    if kernel:
        assert sparse_kernel(sparse, torch.zeros(5, 64)) == kernel
    for x in (torch.randn(5, 64), torch.randn(2, 3, 64), torch.randn(1, 64)):
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    assert sparse.deepsqueeze_param_count() == 64 * 24 + 24
    assert sparse.deepsqueeze_nonzero_count() == int((linear.weight != 0).sum()) + int((linear.bias != 0).sum())
    state = sparse.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], linear.weight.detach())


def test_unknown_sparse_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_SPARSE_KERNEL", "coo")
    sparse = SparseCSRLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ModelError, match="DEEPSQUEEZE_SPARSE_KERNEL='coo'"):
        sparse(torch.randn(2, 8))
