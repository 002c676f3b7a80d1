"""Identical rows merged into one weighted row, for M4's exact (full-gradient) phases.

Every sum the exact phases take (E[b²], the Gram matrix, E[q·b], E[q]) is a sum over rows of a
function of the row alone, so k identical rows are one row of weight k, exactly. Annotations of
web data are mostly binary (groups, multi-hot labels and proxies), so a sample of 5·10⁵ rows
typically holds ~10⁵ distinct rows and every exact step gets that much cheaper; with a
continuous utility nearly every row is distinct and the merge is skipped.
"""
from __future__ import annotations

import numpy as np

from siglip_fair.balance.m4 import Examples

# Merge only when it removes at least this share of the rows (sorting costs about one pass).
MIN_SAVING = 0.25


def _keys(ex: Examples) -> np.ndarray:
  """One uint64 key row per example [n, K]: binary columns bit-packed, others by their bits."""
  n = len(ex.u)
  flat = np.concatenate([np.asarray(x, np.float32).reshape(n, -1) for x in ex], axis=1)
  binary = np.all((flat == 0) | (flat == 1), axis=0)
  packed = np.packbits(flat[:, binary].astype(np.uint8), axis=1)
  packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
  words = np.ascontiguousarray(packed).view(np.uint64)
  # Non-binary values keyed by their float32 bits: equal bits, equal row (+0 and −0 stay apart,
  # which only forgoes a merge).
  other = np.ascontiguousarray(flat[:, ~binary]).view(np.uint32).astype(np.uint64)
  return np.concatenate([words, other], axis=1)


def merge_identical(ex: Examples) -> tuple[Examples, np.ndarray] | None:
  """(distinct rows [k', ...], float32 weights [k']) or None when under MIN_SAVING of the rows
  repeat. Rows come out sorted by content (the same rows give the same output on every
  process); k' is k rounded up to one of 8 sizes per octave with weight-0 rows of zeros, so
  samples with slightly different k share compiled shapes.
  """
  n = len(ex.u)
  if n == 0:
    return None
  keys = _keys(ex)
  if keys.shape[1] == 0:
    order, starts = np.arange(n), np.zeros(1, np.int64)
  else:
    order = np.lexsort(keys.T[::-1])
    k = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], np.any(k[1:] != k[:-1], axis=1)]))
  if len(starts) > (1.0 - MIN_SAVING) * n:
    return None
  counts = np.diff(np.append(starts, n)).astype(np.float32)
  bucket = 2 ** max(0, int(np.log2(len(starts))) - 3)
  size = -(-len(starts) // bucket) * bucket
  pad = size - len(starts)

  def take(x):
    x = np.asarray(x)[order[starts]]
    return np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x

  return Examples(*(take(x) for x in ex)), np.pad(counts, (0, pad))
