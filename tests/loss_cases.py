"""Inputs and references shared by the chunked- and ring-loss parity tests."""
import jax.numpy as jnp
import numpy as np

from siglip_fair.train import losses


def inputs(n, d=16, seed=0):
  """(zimg, ztxt, weights): unit-norm [n, d] pairs with correlated partners, weights [n]."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  zimg = unit(rng.normal(size=(n, d))).astype(np.float32)
  ztxt = unit(zimg + 0.8 * rng.normal(size=(n, d))).astype(np.float32)  # correlated pairs
  weights = rng.uniform(0.2, 2.0, n).astype(np.float32)
  return jnp.asarray(zimg), jnp.asarray(ztxt), jnp.asarray(weights)


def full_loss(name):
  """The full-batch reference with one signature for both: (zimg, ztxt, t, b, w)."""
  if name == "sigmoid":
    return lambda zi, zt, t, b, w: losses.sigmoid_loss(zi, zt, t, b, w)
  return lambda zi, zt, t, b, w: losses.softmax_loss(zi, zt, t, w)
