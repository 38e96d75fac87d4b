"""Bootstrap confidence intervals (of a mean, of a ratio of sums, of a paired difference) and quality retention."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n, arr.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of sum(num) / sum(den), resampling the pairs together
    (e.g. greedy and speculative seconds of the same prompts: the pooled speedup)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size == 0 or a.shape != b.shape:
        raise ValueError(f"bootstrap_ratio_ci needs two equally long non-empty lists, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n, a.size))
    ratios = a[idx].sum(axis=1) / b[idx].sum(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def retention(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Quality retention: mean score / mean full-cache score on the same samples."""
    if len(scores) != len(baseline):
        raise ValueError(f"retention needs paired samples, got {len(scores)} and {len(baseline)}")
    base = float(np.mean(baseline))
    if base == 0:
        return float("nan")
    return float(np.mean(scores)) / base


def retention_ci(scores: Sequence[float], baseline: Sequence[float], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """`retention` and its paired percentile bootstrap CI (the same samples resampled for both);
    NaN where the baseline is 0."""
    kept = retention(scores, baseline)
    a, b = np.asarray(scores, dtype=float), np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n, a.size))
    base = b[idx].mean(axis=1)
    ratios = np.where(base > 0, a[idx].mean(axis=1) / np.where(base > 0, base, 1), np.nan)
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return kept, float("nan"), float("nan")
    alpha = (1 - level) / 2
    return kept, float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def paired_difference(a: Sequence[float], b: Sequence[float], n: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Mean of `a[i] - b[i]` (two methods' scores on the same samples) with its percentile bootstrap CI
    (`bootstrap_ci` of the differences): `a` beats `b` when ci_low > 0. NaN and n = 0 without samples."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs paired samples, got {len(a)} and {len(b)}")
    if not len(a):
        return dict(diff=float("nan"), ci_low=float("nan"), ci_high=float("nan"), n=0)
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low, high = bootstrap_ci(diff, n, seed, level)
    return dict(diff=float(diff.mean()), ci_low=low, ci_high=high, n=int(diff.size))
