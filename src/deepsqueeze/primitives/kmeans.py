"""1-D k-means for weight sharing: initialisations, Lloyd iterations and an exact dynamic program.

Pure tensor math on a flat float tensor of values; returns sorted centroids. ``assign`` maps values to
their nearest centroid (ties to the lower one), which is how weights are turned into indices.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import torch


class Init(StrEnum):
    LINEAR = "linear"    # evenly spaced between min and max (Han et al.'s best: keeps large weights)
    DENSITY = "density"  # evenly spaced on the CDF (quantiles): follows the distribution's mass
    RANDOM = "random"    # k distinct values drawn from the data (Forgy)


def init_centroids(values: torch.Tensor, k: int, init: Init | str = Init.LINEAR, seed: int = 0) -> torch.Tensor:
    """``k`` starting centroids (float64, sorted) for ``values``."""
    x = values.detach().double().ravel()
    if x.numel() == 0:
        raise ValueError("cannot initialise centroids from an empty tensor")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    init = Init(init)
    if init is Init.LINEAR:
        c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    elif init is Init.DENSITY:
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        c = torch.quantile(x, q) if x.numel() <= 16_000_000 else torch.quantile(x[:: x.numel() // 1_000_000], q)
    else:
        gen = torch.Generator().manual_seed(seed)
        uniq = torch.unique(x)
        c = uniq[torch.randperm(uniq.numel(), generator=gen)[: min(k, uniq.numel())]]
    return torch.sort(c).values


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (``centroids`` sorted ascending)."""
    c = centroids.to(values.dtype) if values.is_floating_point() else centroids
    if c.numel() == 1:
        return torch.zeros(values.shape, dtype=torch.long)
    mids = (c[1:] + c[:-1]) / 2
    return torch.bucketize(values, mids, right=False).long()


def lloyd(values: torch.Tensor, centroids: torch.Tensor, iterations: int = 30, tol: float = 0.0) -> torch.Tensor:
    """Lloyd's k-means in 1-D from ``centroids``; empty clusters keep their position. Returns sorted float64."""
    x = values.detach().double().ravel()
    c = torch.sort(centroids.detach().double()).values.clone()
    for _ in range(iterations):
        idx = assign(x, c)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.zeros_like(c).index_add_(0, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = torch.sort(new).values
        shift = float((new - c).abs().max())
        c = new
        if shift <= tol:
            break
    return c


def sse(values: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances from each value to its nearest centroid."""
    x = values.detach().double().ravel()
    c = centroids.double()
    return float(((x - c[assign(x, c)]) ** 2).sum())


def exact_1d(values: torch.Tensor, k: int) -> torch.Tensor:
    """Globally optimal 1-D k-means (minimum SSE), by dynamic programming over the sorted unique values.

    ``D[j][i]`` = best cost of covering the first ``i`` unique values with ``j`` clusters. The optimal
    split point is monotone in ``i`` (1-D k-means costs satisfy the quadrangle inequality), so each row is
    filled by divide and conquer, all sub-problems of one recursion depth evaluated in one vectorised
    batch: O(k m log m) work in O(k log m) numpy calls for ``m`` unique values.
    """
    x = values.detach().double().ravel().numpy()
    if x.size == 0:
        raise ValueError("cannot cluster an empty tensor")
    uniq, counts = np.unique(x, return_counts=True)
    m = uniq.size
    if k >= m:
        return torch.from_numpy(uniq.copy())
    shift = uniq.mean()
    u = uniq - shift
    w = counts.astype(np.float64)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cx = np.concatenate([[0.0], np.cumsum(w * u)])
    cxx = np.concatenate([[0.0], np.cumsum(w * u * u)])

    def cost(t: np.ndarray, i: np.ndarray) -> np.ndarray:  # SSE of unique values t..i-1 (t < i)
        n = cw[i] - cw[t]
        s = cx[i] - cx[t]
        return np.maximum(cxx[i] - cxx[t] - s * s / np.maximum(n, 1e-300), 0.0)

    prev = cost(np.zeros(m + 1, dtype=np.int64), np.arange(m + 1))  # one cluster over the first i values
    prev[0] = 0.0
    splits = np.zeros((k + 1, m + 1), dtype=np.int64)
    for j in range(2, k + 1):
        cur = np.full(m + 1, np.inf)
        arg = np.zeros(m + 1, dtype=np.int64)
        # Tasks: (lo, hi, opt_lo, opt_hi) over i in [lo, hi]; i ranges over j..m (need >= j values).
        tasks = np.array([[j, m, j - 1, m - 1]], dtype=np.int64)
        while tasks.size:
            lo, hi, olo, ohi = tasks.T
            mid = (lo + hi) // 2
            top = np.minimum(ohi, mid - 1)
            span = top - olo + 1
            owner = np.repeat(np.arange(mid.size), span)
            cand = olo[owner] + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
            val = prev[cand] + cost(cand, mid[owner])
            # segment argmin (first minimum) over the contiguous candidate runs of each task
            first = np.cumsum(span) - span
            seg_min = np.minimum.reduceat(val, first)
            pos = np.where(val <= seg_min[owner], np.arange(val.size), val.size)
            best = cand[np.minimum.reduceat(pos, first)]
            cur[mid] = seg_min
            arg[mid] = best
            left = np.stack([lo, mid - 1, olo, best], axis=1)[lo <= mid - 1]
            right = np.stack([mid + 1, hi, best, ohi], axis=1)[mid + 1 <= hi]
            tasks = np.concatenate([left, right])
        splits[j] = arg
        prev = cur
        prev[:j] = np.inf
    # Walk the split points back from (k, m).
    bounds = [m]
    i = m
    for j in range(k, 1, -1):
        i = int(splits[j][i])
        bounds.append(i)
    bounds.append(0)
    bounds = bounds[::-1]
    b0, b1 = np.asarray(bounds[:-1]), np.asarray(bounds[1:])
    means = (cx[b1] - cx[b0]) / (cw[b1] - cw[b0]) + shift
    return torch.from_numpy(np.sort(means))
