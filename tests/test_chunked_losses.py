"""Row-chunked (inside one device) SigLIP and CLIP losses against the full-batch losses: value,
gradients, metrics, sharded inputs, compiled temporary memory and input validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from siglip_fair.train import chunked_losses, losses
from loss_cases import full_loss, inputs

T, BIAS = 7.3, -4.1


def _value_and_grads(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))


@functools.cache
def _reference(name, n, weighted):
  zimg, ztxt, weights = inputs(n, seed=n)
  args = (zimg, ztxt, jnp.float32(T), jnp.float32(BIAS), weights if weighted else None)
  return args, _value_and_grads(full_loss(name))(*args)


def _rel(a, b, floor=0.0):
  """Max abs error relative to max(the reference's largest entry, floor); exact zeros (B = 1
  has no negatives, so CLIP's loss and gradients vanish) are compared at float32 rounding.

  The t and b gradients are sums of O(1) terms (similarities, probabilities) that can cancel
  to ~0 (e.g. B = 7 here: dL/dt = 2.8e-6 while both float32 losses are ~3e-8 off the float64
  value), so they are judged against that O(1) scale (floor=1) rather than their own size."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err, scale = np.max(np.abs(a - b)), max(np.max(np.abs(b)), floor)
  return err / scale if scale > 0 else err / 1e-1


# (B, chunk, weighted): one block, chunk > B, chunk 1, even splits and uneven (padded) last
# blocks; weighting alternates to keep the number of compilations down.
CASES = [(1, 1, False), (1, 4, True), (7, 1, True), (7, 5, False), (7, 64, True),
         (16, 4, False), (16, 5, True), (16, 16, False), (33, 4, True), (33, 5, False),
         (33, 16, True), (33, 64, False)]


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n, chunk, weighted", CASES)
def test_chunked_equals_full_loss_in_value_gradient_and_metrics(name, n, chunk, weighted):
  args, ((want, want_metrics), want_grads) = _reference(name, n, weighted)
  (got, got_metrics), grads = _value_and_grads(chunked_losses.chunked_loss(name, chunk))(*args)
  assert _rel(got, want) <= 1e-5
  for key in ("pos_logit", "neg_logit"):  # neg_logit is 0 for B = 1: absolute tolerance
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
  for i, (g, e) in enumerate(zip(grads, want_grads)):
    if name == "softmax" and i == 3:  # no bias in CLIP: both zero
      assert float(g) == float(e) == 0.0
      continue
    assert _rel(g, e, floor=1.0 if i >= 2 else 0.0) <= 1e-5, (name, i)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_direct_functions_under_jit_with_shardedinputs(name):
  zimg, ztxt, weights = inputs(24, seed=3)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  if name == "sigmoid":
    chunked = lambda zi, zt, w: chunked_losses.sigmoid_chunked_loss(zi, zt, T, BIAS, w, chunk=5)
    full = lambda zi, zt, w: losses.sigmoid_loss(zi, zt, T, BIAS, w)
  else:
    chunked = lambda zi, zt, w: chunked_losses.softmax_chunked_loss(zi, zt, T, w, chunk=5)
    full = lambda zi, zt, w: losses.softmax_loss(zi, zt, T, w)
  (got, _), got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
      shard(zimg), shard(ztxt), shard(weights))
  (want, _), want_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(
      zimg, ztxt, weights)
  assert _rel(got, want) <= 1e-5
  for g, e in zip(got_grads, want_grads):
    assert _rel(g, e) <= 1e-5


def _temp_bytes(fn, n, d):
  zimg = ztxt = jax.ShapeDtypeStruct((n, d), jnp.float32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  grad = jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2, 3))
  return jax.jit(grad).lower(zimg, ztxt, scalar, scalar).compile().memory_analysis() \
      .temp_size_in_bytes


def test_chunked_sigmoid_temp_memory_is_a_fraction_offull_loss():
  n, d, chunk = 2048, 64, 128
  full = _temp_bytes(losses.sigmoid_loss, n, d)
  chunked = _temp_bytes(chunked_losses.chunked_loss("sigmoid", chunk), n, d)
  # Measured ~0.066 (≈ two [chunk, B] f32 blocks against two [B, B]); a single [B, B] f32
  # buffer alone is 1/2 of the full loss's, so any non-chunked implementation fails both.
  assert chunked <= full / 8, (chunked, full)
  assert chunked < n * n * 4, chunked


def test_bad_inputs_raise():
  zimg, ztxt, weights = inputs(8)
  for chunk in (0, -3, 2.0, True, None):
    with pytest.raises(ValueError, match="chunk must be a positive int"):
      chunked_losses.chunked_loss("sigmoid", chunk)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
      chunked_losses.softmax_chunked_loss(zimg, ztxt, T, chunk=chunk)
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    chunked_losses.chunked_loss("hinge", 4)
  for name in ("sigmoid", "softmax"):
    fn = chunked_losses.chunked_loss(name, 4)
    with pytest.raises(ValueError, match="same shape"):
      fn(zimg, ztxt[:3], T, BIAS)
    with pytest.raises(ValueError, match="same shape"):
      fn(zimg[0], ztxt[0], T, BIAS)
    with pytest.raises(ValueError, match="weights must be"):
      fn(zimg, ztxt, T, BIAS, weights[:5])


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_chunked_losses_trace_at_a_batch_beyond_int32_pair_counts(name):
  # 46,342 · 46,341 > 2**31 − 1. eval_shape traces without running the scan; the negative
  # count used to be parsed as an int32 divisor and overflow while tracing.
  z = jax.ShapeDtypeStruct((46_342, 2), jnp.float32)
  loss, metrics = jax.eval_shape(
      lambda zi, zt: chunked_losses.chunked_loss(name, 4096)(zi, zt, T, BIAS), z, z)
  assert (loss.shape, loss.dtype) == ((), jnp.float32)
  assert {k: v.shape for k, v in metrics.items()} == {"pos_logit": (), "neg_logit": ()}


@pytest.mark.parametrize("seed", range(6))
def test_chunked_logit_metrics_match_numpy_means_over_seeds(seed):
  rng = np.random.default_rng(100 + seed)
  n, chunk = int(rng.integers(1, 40)), int(rng.integers(1, 12))
  zimg, ztxt, _ = inputs(n, d=int(rng.integers(2, 9)), seed=seed)
  logits = T * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T + BIAS
  off = ~np.eye(n, dtype=bool)
  for name, shift in (("sigmoid", 0.0), ("softmax", BIAS)):
    _, m = chunked_losses.chunked_loss(name, chunk)(zimg, ztxt, T, BIAS)
    np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits)) - shift, rtol=1e-5,
                               atol=1e-5)
    neg = np.mean(logits[off]) - shift if n > 1 else 0.0  # no negatives: 0 / max(0, 1)
    np.testing.assert_allclose(m["neg_logit"], neg, rtol=1e-5, atol=1e-5)
