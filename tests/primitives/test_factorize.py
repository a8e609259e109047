"""Factorization primitives against numpy / TensorLy references on small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.primitives.factorize import (
    cp_factors,
    cp_params,
    cp_reconstruct,
    energy_rank,
    hosvd_relative_error,
    linear_factored_params,
    singular_values,
    svd_factors,
    svd_relative_errors,
    tucker2_factors,
    tucker2_params,
    tucker2_reconstruct,
)


def _numpy_best_rank(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 12), inp=st.integers(2, 12), seed=st.integers(0, 2**16), data=st.data())
def test_svd_factors_equal_the_numpy_best_approximation(out, inp, seed, data):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = data.draw(st.integers(1, min(out, inp)))
    first, second = svd_factors(w, r)
    assert first.shape == (r, inp) and second.shape == (out, r)
    np.testing.assert_allclose((second @ first).numpy(), _numpy_best_rank(w.numpy(), r), atol=1e-10)
    # The reported error is the Eckart-Young tail, and equals the actual error of the product.
    rel = float((w - second @ first).norm() / w.norm())
    assert svd_relative_errors(w)[r - 1].item() == pytest.approx(rel, abs=1e-9)


def test_full_rank_svd_is_exact_and_factors_are_balanced():
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    first, second = svd_factors(w, 6)
    torch.testing.assert_close(second @ first, w, atol=1e-5, rtol=1e-5)
    # sqrt(s) on each side: the factors carry the same Frobenius norm.
    assert first.norm().item() == pytest.approx(second.norm().item(), rel=1e-5)
    assert first.dtype == w.dtype


def test_energy_rank_is_the_smallest_rank_reaching_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25
    assert energy_rank(s, 9 / 14.25) == 1
    assert energy_rank(s, 9 / 14.25 + 1e-6) == 2
    assert energy_rank(s, 14 / 14.25) == 3 and energy_rank(s, 0.99) == 4
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(torch.zeros(3), 0.9) == 1
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_singular_values_match_numpy():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(singular_values(w).numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False),
                               rtol=1e-10)


def test_svd_factors_reject_bad_rank_and_shape():
    with pytest.raises(ValueError, match="rank"):
        svd_factors(torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match="2-D"):
        svd_factors(torch.randn(3, 4, 2), 1)


def test_tucker2_matches_tensorly_partial_tucker():
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    k = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first, core, last = tucker2_factors(k, (4, 3))
    assert first.shape == (3, 6) and core.shape == (4, 3, 3, 3) and last.shape == (8, 4)
    ours = tucker2_reconstruct(first, core, last)
    (t_core, factors), _ = partial_tucker(k.numpy(), rank=[4, 3], modes=[0, 1], init="svd", n_iter_max=50, tol=1e-8)
    ref = multi_mode_dot(t_core, factors, modes=[0, 1])
    # Same algorithm, same start: the fit matches TensorLy's to within its stopping tolerance.
    ours_err = float((k - ours).norm())
    assert ours_err <= float(np.linalg.norm(k.numpy() - ref)) * (1 + 1e-4)
    np.testing.assert_allclose(ours.numpy(), ref, atol=5e-3)
    # HOOI never does worse than the truncated HOSVD, which is its starting point.
    rel = float((k - ours).norm() / k.norm())
    assert rel <= hosvd_relative_error(k, (4, 3)) + 1e-9
    assert 0.0 < rel < 1.0


def test_tucker2_of_an_exact_low_multilinear_rank_kernel_is_exact():
    g = torch.Generator().manual_seed(4)
    core = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    last, first = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    k = tucker2_reconstruct(first, core, last)
    f, c, lst = tucker2_factors(k, (3, 2))
    torch.testing.assert_close(tucker2_reconstruct(f, c, lst), k, atol=1e-9, rtol=1e-9)
    assert hosvd_relative_error(k, (3, 2)) < 1e-10


def test_cp_recovers_an_exact_rank_two_kernel_and_matches_tensorly():
    from tensorly.cp_tensor import cp_to_tensor
    from tensorly.decomposition import parafac

    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (6, 4, 3, 3)]
    k = torch.einsum("or,ir,yr,xr->oiyx", *parts)
    first, vertical, horizontal, last = cp_factors(k, 2)
    assert first.shape == (2, 4) and vertical.shape == (2, 3) and horizontal.shape == (2, 3) and last.shape == (6, 2)
    rel = float((cp_reconstruct(first, vertical, horizontal, last) - k).norm() / k.norm())
    assert rel < 1e-6
    # On a generic kernel our error equals TensorLy's own PARAFAC at the same settings.
    k2 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    ours = cp_reconstruct(*cp_factors(k2, 3))
    ref = cp_to_tensor(parafac(k2.numpy(), 3, n_iter_max=200, init="svd", tol=1e-10))
    assert float((ours - k2).norm()) == pytest.approx(float(np.linalg.norm(ref - k2.numpy())), rel=1e-6)


def test_parameter_counts():
    assert linear_factored_params(300, 784, 10) == 10 * (300 + 784)
    assert tucker2_params(64, 32, 3, 3, (16, 8)) == 8 * 32 + 16 * 8 * 9 + 64 * 16
    assert cp_params(64, 32, 3, 3, 5) == 5 * (32 + 3 + 3 + 64)


def test_hosvd_error_table_matches_the_direct_computation():
    from deepsqueeze.primitives.factorize import hosvd_error_table

    k = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    table = hosvd_error_table(k)
    assert table.shape == (6, 5)
    for a, b in ((1, 1), (2, 4), (6, 5), (3, 2)):
        assert table[a - 1, b - 1].item() == pytest.approx(hosvd_relative_error(k, (a, b)), abs=1e-9)
