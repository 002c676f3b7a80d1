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
  """One uint64 key row per example [n, K]: 0/1 fields bit-packed, any other by its bits.

  Field by field, in the field's own dtype: the sample is wide (10⁵–10⁶ rows × 100 columns), so
  one float copy of it costs more than the sort.
  """
  n = len(ex.u)
  packed, other = [], []
  for x in ex:
    x = np.asarray(x).reshape(n, -1)
    if not x.shape[1]:
      continue
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
      binary = x.size == 0 or (x.min() >= 0 and x.max() <= 1)
    else:
      binary = bool(np.all((x == 0) | (x == 1)))
    if binary:
      packed.append(np.packbits(x.astype(np.uint8, copy=False), axis=1))
    else:
      # By the float32 bits: equal bits, equal row (+0 and −0 stay apart: a merge forgone).
      other.append(np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64))
  keys = []
  if packed:
    packed = np.concatenate(packed, axis=1)
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    keys.append(np.ascontiguousarray(packed).view(np.uint64))
  keys += other
  return np.concatenate(keys, axis=1) if keys else np.zeros((n, 0), np.uint64)


def _hash(keys: np.ndarray) -> np.ndarray:
  """A 64-bit mix of each key row [n] (multiply-xorshift per word)."""
  h = np.zeros(len(keys), np.uint64)
  for col in keys.T:
    h = (h ^ col) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
  return h


def _sort(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(order, run starts): rows sorted so that identical keys are adjacent.

  Sorting one hash is ~4x faster than a lexsort of the key words; when two different keys
  share a hash (~n²/2⁶⁵ odds) the lexsort is used, so each distinct row is one run either way.
  """
  h = _hash(keys)
  order = np.argsort(h, kind="stable")
  k, hs = np.take(keys, order, axis=0), h[order]  # np.take: 2-D fancy indexing is slow
  differ = np.any(k[1:] != k[:-1], axis=1)
  if np.any(differ & (hs[1:] == hs[:-1])):
    order = np.lexsort(keys.T[::-1])
    k = np.take(keys, order, axis=0)
    differ = np.any(k[1:] != k[:-1], axis=1)
  return order, np.flatnonzero(np.concatenate([[True], differ]))


def merge_identical(ex: Examples) -> tuple[Examples, np.ndarray] | None:
  """(distinct rows [k', ...], float32 weights [k']) or None when under MIN_SAVING of the rows
  repeat. Rows come out in an order fixed by their content (the same rows give the same output
  on every process); k' is k rounded up to one of 8 sizes per octave with weight-0 rows of zeros, so
  samples with slightly different k share compiled shapes.
  """
  n = len(ex.u)
  if n == 0:
    return None
  keys = _keys(ex)
  if keys.shape[1] == 0:
    order, starts = np.arange(n), np.zeros(1, np.int64)
  else:
    order, starts = _sort(keys)
  if len(starts) > (1.0 - MIN_SAVING) * n:
    return None
  counts = np.diff(np.append(starts, n)).astype(np.float32)
  bucket = 2 ** max(0, int(np.log2(len(starts))) - 3)
  size = -(-len(starts) // bucket) * bucket
  pad = size - len(starts)

  def take(x):
    x = np.take(np.asarray(x), order[starts], axis=0)
    return np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x

  return Examples(*(take(x) for x in ex)), np.pad(counts, (0, pad))
