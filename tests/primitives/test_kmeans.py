"""k-means primitives: initialisations, Lloyd, and the exact 1-D dynamic program against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.primitives.kmeans import Init, assign, exact_1d, init_centroids, lloyd, sse


def _brute_force_sse(values: np.ndarray, k: int) -> float:
    """Optimal SSE by trying every split of the sorted unique values into k contiguous groups."""
    uniq = np.unique(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, uniq.size), k - 1):
        bounds = (0, *cuts, uniq.size)
        pairs = list(zip(bounds[:-1], bounds[1:], strict=True))
        centroids = [values[(values >= uniq[a]) & (values <= uniq[b - 1])].mean() for a, b in pairs]
        best = min(best, sse(torch.from_numpy(values), torch.tensor(sorted(centroids))))
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-20, 20), min_size=1, max_size=12), st.integers(1, 4))
def test_exact_1d_matches_brute_force(raw: list[int], k: int) -> None:
    values = np.asarray(raw, dtype=np.float64) / 4
    k = min(k, np.unique(values).size)
    got = exact_1d(torch.from_numpy(values), k)
    assert got.numel() == k and torch.all(got[1:] > got[:-1])
    assert sse(torch.from_numpy(values), got) == pytest.approx(_brute_force_sse(values, k), rel=1e-9, abs=1e-9)


def test_exact_1d_never_worse_than_lloyd_and_fast_on_many_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g, dtype=torch.float64) * torch.rand(10_000, generator=g, dtype=torch.float64)
    for k in (4, 32):
        exact = exact_1d(x, k)
        for init in Init:
            assert sse(x, exact) <= sse(x, lloyd(x, init_centroids(x, k, init, seed=1))) + 1e-9


def test_exact_1d_returns_the_unique_values_when_k_is_large() -> None:
    x = torch.tensor([3.0, 1.0, 3.0, 2.0])
    assert torch.equal(exact_1d(x, 8), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_lloyd_decreases_sse_and_keeps_sorted_centroids() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g)
    start = init_centroids(x, 16, Init.RANDOM, seed=3)
    done = lloyd(x, start)
    assert sse(x, done) < sse(x, start)
    assert torch.all(done[1:] >= done[:-1])


def test_inits() -> None:
    x = torch.linspace(-1, 1, 101)
    assert torch.allclose(init_centroids(x, 3, Init.LINEAR), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    dens = init_centroids(x, 4, Init.DENSITY)
    assert torch.allclose(dens, torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64))
    rnd = init_centroids(x, 5, Init.RANDOM, seed=7)
    assert rnd.numel() == 5 and all(bool((x.double() == c).any()) for c in rnd)
    assert torch.equal(rnd, init_centroids(x, 5, Init.RANDOM, seed=7))
    with pytest.raises(ValueError):
        init_centroids(torch.zeros(0), 3)


def test_assign_picks_nearest_centroid() -> None:
    c = torch.tensor([-1.0, 0.5, 2.0])
    x = torch.tensor([-3.0, -0.26, -0.24, 1.24, 1.26, 9.0])
    assert assign(x, c).tolist() == [0, 0, 1, 1, 2, 2]
