"""The random half of M4's output: which rows a keep-probability vector keeps or repeats.

Draws are a pure function of (key, global row index): row i uses entry i mod 2^16 of the
uniforms drawn from `key` folded with i // 2^16, so a keep mask is the same whatever the shard
layout, chunk size or process split that computed q.
"""
import jax
import numpy as np

_BLOCK = 1 << 16  # one PRNG key per block of global row indices


@jax.jit
def _block_uniforms(key, block):
  return jax.random.uniform(jax.random.fold_in(key, block), (_BLOCK,))


def uniforms(key: jax.Array, start: int, n: int) -> np.ndarray:
  """U(0, 1) float32 [n] for global rows [start, start + n): row i is entry i mod 2^16 of the
  draw from key folded with i // 2^16, so any shard layout or process split draws the same
  number for the same row."""
  if n == 0:
    return np.zeros(0, np.float32)
  first, last = start // _BLOCK, (start + n - 1) // _BLOCK
  u = np.concatenate([np.asarray(_block_uniforms(key, np.uint32(b)))
                      for b in range(first, last + 1)])
  return u[start - first * _BLOCK:start - first * _BLOCK + n]


def keep_mask(q, key: jax.Array, start: int = 0) -> np.ndarray:
  """Independent Bernoulli(q_i) draws for rows start.. of q: bool [N]; same key, same mask."""
  q = np.asarray(q, np.float32)
  return uniforms(key, start, q.shape[0]) < q


def repeat_counts(q, eta: float, key: jax.Array, start: int = 0) -> np.ndarray:
  """Integer copies per row with E[r_i] = q_i / η, so E[Σ r] = N: a balanced dataset the size of
  the baseline (the paper repeats kept examples). int32 [N], stochastic rounding."""
  x = np.asarray(q, np.float64) / eta
  u = uniforms(jax.random.fold_in(key, 1), start, x.shape[0])
  return (np.floor(x) + (u < x - np.floor(x))).astype(np.int32)
