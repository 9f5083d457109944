"""Equal-width binning over [0, 1], netcal's rule (spec section 4, step 4), shared by every binned metric."""

from __future__ import annotations

import numpy as np

_EPS = np.finfo(np.float64).eps


def check_num_bins(num_bins, name: str = "num_bins") -> int:
    """``num_bins`` as a positive int, or ``ValueError``."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_bins!r}")
    return int(num_bins)


def bin_edges(num_bins: int) -> np.ndarray:
    """``linspace(0, 1, num_bins + 1)``: float64 edges, so ``edges[3]`` of 10 bins is 0.30000000000000004."""
    return np.linspace(0.0, 1.0, num_bins + 1)


def clip_to_open_unit(values) -> np.ndarray:
    """Cast to float64, then clip to ``[eps, 1 - eps]`` so 0 and 1 land in the first and last bins.

    Casting first matters: float32 0.9 is 0.89999998, and netcal on float32 input bins such values
    inconsistently (spec section 4, step 4).
    """
    return np.clip(np.asarray(values, dtype=np.float64), _EPS, 1.0 - _EPS)


def bin_index(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Half-open bin ``k`` with ``edges[k] <= v < edges[k + 1]`` for already clipped values; ``[N]`` int64."""
    return np.searchsorted(bin_edges(num_bins), values, side="right") - 1


def binned_means(bins: np.ndarray, num_bins: int, *values: np.ndarray):
    """Per-bin counts and means.

    Args:
        bins: ``[N]`` bin index of each sample.
        values: arrays ``[N]`` to average per bin.

    Returns:
        ``(counts [num_bins] int64, means...)``, each mean ``[num_bins]`` float64, NaN for empty bins.
    """
    counts = np.bincount(bins, minlength=num_bins)
    means = []
    for value in values:
        sums = np.bincount(bins, weights=np.asarray(value, dtype=np.float64), minlength=num_bins)
        means.append(np.divide(sums, counts, out=np.full(num_bins, np.nan), where=counts > 0))
    return (counts, *means)


def weighted_gap(counts: np.ndarray, observed: np.ndarray, predicted: np.ndarray) -> float:
    """``sum_k (n_k / N) * |observed_k - predicted_k|`` over non-empty bins; NaN when ``N = 0``."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    occupied = counts > 0
    return float(np.sum(counts[occupied] / total * np.abs(observed[occupied] - predicted[occupied])))
