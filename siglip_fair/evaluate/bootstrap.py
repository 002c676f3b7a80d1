"""Percentile bootstrap confidence intervals over rows (images)."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def bootstrap_ci(
    stat_fn: Callable[..., np.ndarray],
    *arrays: np.ndarray,
    seed: int | np.random.Generator = 0,
    num_samples: int = 1000,
    alpha: float = 0.05,
    batch_size: int = 250,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Point estimate and (1 - alpha) percentile interval of a statistic.

  Rows are resampled jointly: replicate b uses rows `idx[b]` of every array,
  where `idx = np.random.default_rng(seed).integers(0, n, (num_samples, n))`.
  All replicates of a batch go through ONE call of `stat_fn`, so the statistic
  must be vectorised over a leading replicate axis.

  Args:
    stat_fn: maps arrays [B, n, ...] (one per input, same order) to the
      statistic [B] or [B, ...]; e.g. `lambda x: x.mean(-1)` for x [B, n].
    *arrays: [n, ...] each, sharing the row axis.
    seed: seed or numpy Generator for the resampling indices.
    num_samples: number of bootstrap replicates.
    alpha: 1 - coverage (0.05 -> 95 % interval).
    batch_size: replicates gathered at once (bounds memory to about
      batch_size * n * row size).

  Returns:
    (point, lo, hi), each of the statistic's shape. Replicates where the
    statistic is NaN (e.g. a resample that lost every image of a group) are
    left out of the percentiles; a bound is NaN when all of them are.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array to resample.")
  arrays = tuple(np.asarray(a) for a in arrays)
  n = arrays[0].shape[0] if arrays[0].ndim else 0
  if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
    raise ValueError("bootstrap_ci needs non-empty arrays sharing the row "
                     f"axis; got shapes {[a.shape for a in arrays]}.")
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} "
                     "must be >= 1.")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha={alpha} must lie in (0, 1), e.g. 0.05.")

  point = np.asarray(stat_fn(*(a[None] for a in arrays)))[0]
  idx = np.random.default_rng(seed).integers(0, n, (num_samples, n))
  stats = np.concatenate([
      np.asarray(stat_fn(*(a[idx[i:i + batch_size]] for a in arrays)))
      for i in range(0, num_samples, batch_size)])
  if stats.shape != (num_samples,) + point.shape:
    raise ValueError(f"stat_fn returned {stats.shape[1:]} per replicate but "
                     f"{point.shape} for the data; it must map [B, n, ...] "
                     "inputs to [B, ...].")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
    lo, hi = np.nanpercentile(stats, [50 * alpha, 100 - 50 * alpha], axis=0)
  return point, lo, hi
