"""Pseudo groups: k-means on prompt-similarity vectors, and how well they match true groups.

`kmeans` is jitted end to end: k-means++ seeding (each new centre drawn with probability
proportional to the squared distance to the nearest chosen one), Lloyd iterations until the
centres stop moving, `restarts` independent runs vmapped over keys, and the run with the lowest
inertia kept. The quality scores are computed from the contingency table in float64 numpy.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import comb


class KMeansResult(NamedTuple):
  """centers f32 [k, d]; labels i32 [n] in [0, k); inertia: Σ squared distance to the centre."""
  centers: jax.Array
  labels: jax.Array
  inertia: jax.Array


def _sq_dists(x, centers):
  """[n, k] squared Euclidean distances, as ||x||² − 2 x·c + ||c||² (clipped at 0)."""
  d = (jnp.sum(x * x, 1)[:, None] - 2.0 * x @ centers.T + jnp.sum(centers * centers, 1)[None])
  return jnp.maximum(d, 0.0)


def _plus_plus(key, x, k):
  n = x.shape[0]
  first_key, key = jax.random.split(key)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(first_key, (), 0,
                                                                                 n)])
  nearest = _sq_dists(x, centers[:1])[:, 0]

  def add(i, carry):
    centers, nearest, key = carry
    key, sub = jax.random.split(key)
    # All points equal to chosen centres (nearest = 0 everywhere): fall back to uniform.
    logits = jnp.where(jnp.sum(nearest) > 0, jnp.log(nearest), 0.0)
    new = x[jax.random.categorical(sub, logits)]
    centers = centers.at[i].set(new)
    nearest = jnp.minimum(nearest, jnp.sum((x - new) ** 2, axis=1))
    return centers, nearest, key

  centers, _, _ = jax.lax.fori_loop(1, k, add, (centers, nearest, key))
  return centers


def _lloyd(x, centers, iters, tol):
  k = centers.shape[0]

  def step(carry):
    centers, _, i = carry
    labels = jnp.argmin(_sq_dists(x, centers), axis=1)
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
    counts = onehot.sum(0)
    means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    # An empty cluster keeps its centre rather than collapsing to the origin.
    new = jnp.where(counts[:, None] > 0, means, centers)
    return new, jnp.max(jnp.sum((new - centers) ** 2, axis=1)), i + 1

  def running(carry):
    _, shift, i = carry
    return (shift > tol) & (i < iters)

  centers, _, _ = jax.lax.while_loop(running, step, (centers, jnp.inf, 0))
  dists = _sq_dists(x, centers)
  labels = jnp.argmin(dists, axis=1)
  return centers, labels.astype(jnp.int32), jnp.sum(jnp.min(dists, axis=1))


@functools.partial(jax.jit, static_argnames=("k", "restarts", "iters"))
def _kmeans(x, key, k, restarts, iters, tol):
  def one(key):
    return _lloyd(x, _plus_plus(key, x, k), iters, tol)

  centers, labels, inertia = jax.vmap(one)(jax.random.split(key, restarts))
  best = jnp.argmin(inertia)
  return KMeansResult(centers[best], labels[best], inertia[best])


def kmeans(x, k: int, *, key, restarts: int = 4, iters: int = 300,
           tol: float = 1e-8) -> KMeansResult:
  """k-means of the rows of `x` [n, d] (float32), best of `restarts` k-means++ runs.

  Args:
    x: [n, d] points (e.g. similarity vectors to attribute prompts).
    k: number of clusters, 1 <= k <= n.
    key: PRNG key; the result is a pure function of it.
    restarts: independent seedings; the lowest inertia wins.
    iters: cap on Lloyd iterations per run.
    tol: stop when no centre moves by more than sqrt(tol).
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"kmeans needs points [n, d] with n >= 1, got shape {x.shape}.")
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f"kmeans: k={k} must lie in [1, n={x.shape[0]}].")
  if restarts < 1 or iters < 1:
    raise ValueError(f"kmeans: restarts={restarts} and iters={iters} must be >= 1.")
  return _kmeans(x, key, int(k), int(restarts), int(iters), float(tol))


def _contingency(labels_true, labels_pred) -> np.ndarray:
  a, b = np.asarray(labels_true), np.asarray(labels_pred)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f"labels must be two non-empty [n] arrays of equal length, got {a.shape} "
                     f"and {b.shape}.")
  _, ia = np.unique(a, return_inverse=True)
  _, ib = np.unique(b, return_inverse=True)
  table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
  np.add.at(table, (ia, ib), 1)
  return table


def adjusted_rand_index(labels_true, labels_pred) -> float:
  """Hubert–Arabie ARI: 1 for identical partitions (up to renaming), ~0 for random ones."""
  table = _contingency(labels_true, labels_pred)
  n = table.sum()
  pairs = comb(table, 2).sum()
  rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
  expected = rows * cols / comb(n, 2) if n > 1 else 0.0
  top = 0.5 * (rows + cols)
  if top == expected:  # both partitions trivial (one cluster, or all singletons)
    return 1.0
  return float((pairs - expected) / (top - expected))


def normalized_mutual_info(labels_true, labels_pred) -> float:
  """Mutual information over the arithmetic mean of the two entropies (in [0, 1])."""
  table = _contingency(labels_true, labels_pred).astype(np.float64)
  p = table / table.sum()
  pa, pb = p.sum(1), p.sum(0)
  nz = p > 0
  mi = np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz]))
  ha, hb = -np.sum(pa * np.log(pa)), -np.sum(pb * np.log(pb))
  if ha == 0 and hb == 0:
    return 1.0
  denom = 0.5 * (ha + hb)
  return float(max(mi, 0.0) / denom) if denom > 0 else 0.0


def purity(labels_true, labels_pred) -> float:
  """Share of points whose cluster's majority true group is their own."""
  table = _contingency(labels_true, labels_pred)
  return float(table.max(axis=0).sum() / table.sum())
