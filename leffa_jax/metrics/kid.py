"""Kernel Inception Distance as clean-fid's `kernel_distance` (VtonEval reports it x1000).

Cubic polynomial kernel k(x, y) = (x.y / d + 1)^3; `num_subsets` (100) draws of m = min(N1, N2,
1000) rows without replacement from each set (first from `features2`, then from `features1`,
like clean-fid), unbiased MMD^2 per subset, averaged. clean-fid draws from numpy's global RNG
without a seed; here `seed` seeds a `RandomState`, which equals `np.random.seed(seed)` before
clean-fid's call. Arithmetic stays in the features' dtype (float32 from the networks), as in
clean-fid.
"""

from __future__ import annotations

import numpy as np


def kernel_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int | None = 0) -> float:
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature sets, got {f1.shape} and {f2.shape}")
    rng = np.random.RandomState(seed) if seed is not None else np.random
    n = f1.shape[1]
    m = min(min(f1.shape[0], f2.shape[0]), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {f1.shape[0]} and {f2.shape[0]}")
    t = 0
    for _ in range(num_subsets):
        x = f2[rng.choice(f2.shape[0], m, replace=False)]
        y = f1[rng.choice(f1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)
