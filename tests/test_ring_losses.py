"""Ring (chunked across devices) SigLIP and CLIP losses against the full-batch losses, in value
and gradient, on fake CPU devices (open_clip-style parity tests)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from siglip_fair.train import losses, ring_losses
from loss_cases import full_loss, inputs


def _mesh(num):
  return jax.make_mesh((num,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:num])


def _rel(a, b):
  """Max abs error relative to the reference's largest entry; exact zeros (B = 1 has no
  negatives, so CLIP's loss and gradients vanish) are compared at float32 rounding (1e-6)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
  return err / scale if scale > 0 else err / 1e-1


# (devices, global batch): even splits, one row per device, and uneven edges (padding).
CASES = [(8, 8), (8, 32), (4, 24), (2, 6), (8, 13), (4, 3), (8, 1)]


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("num, n", CASES)
def test_ring_equals_full_loss_in_value_and_gradient(name, num, n):
  zimg, ztxt, weights = inputs(n, seed=num * 100 + n)
  t, b = jnp.float32(7.3), jnp.float32(-4.1)
  ring = ring_losses.ring_loss(name, _mesh(num))
  full = full_loss(name)

  def value(fn):
    return lambda zi, zt, t, b, w: fn(zi, zt, t, b, w)[0]

  args = (zimg, ztxt, t, b, weights)
  got, got_metrics = jax.jit(ring)(*args)
  want, want_metrics = full(*args)
  assert _rel(got, want) <= 1e-5
  for key in ("pos_logit", "neg_logit"):  # neg_logit is 0 for B = 1: absolute tolerance
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(value(ring), argnums=(0, 1, 2, 3, 4)))(*args)
  expected = jax.grad(value(full), argnums=(0, 1, 2, 3, 4))(*args)
  for i, (g, e) in enumerate(zip(grads, expected)):
    if name == "softmax" and i == 3:  # no bias in CLIP: both zero
      assert float(g) == float(e) == 0.0
      continue
    assert _rel(g, e) <= 1e-5, (name, i)


def test_ring_without_weights_and_errors():
  zimg, ztxt, _ = inputs(16)
  ring = ring_losses.ring_loss("sigmoid", _mesh(4))
  np.testing.assert_allclose(ring(zimg, ztxt, 10.0, -10.0)[0],
                             losses.sigmoid_loss(zimg, ztxt, 10.0, -10.0)[0], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    ring_losses.ring_loss("hinge", _mesh(2))
  with pytest.raises(ValueError, match="same shape"):
    ring(zimg, ztxt[:3], 10.0, -10.0)


def test_ring_temporaries_are_a_fraction_of_the_full_loss():
  # Compiled temporary memory of one loss evaluation: the full loss materialises [B, B] logits,
  # the ring only [B/D, B/D] per device.
  n, d = 2048, 32
  zimg, ztxt, weights = inputs(n, d)
  mesh = _mesh(8)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = [jax.device_put(x, sharding) for x in (zimg, ztxt)]
  ring = jax.jit(ring_losses.ring_loss("sigmoid", mesh))
  full = jax.jit(lambda zi, zt, t, b: losses.sigmoid_loss(zi, zt, t, b)[0])
  ring_mem = ring.lower(*args, 10.0, -10.0).compile().memory_analysis()
  full_mem = full.lower(*args, 10.0, -10.0).compile().memory_analysis()
  assert ring_mem.temp_size_in_bytes * 4 <= full_mem.temp_size_in_bytes, (
      ring_mem.temp_size_in_bytes, full_mem.temp_size_in_bytes)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_ring_gradient_temporaries_are_at_most_a_quarter_of_the_full_loss(name):
  # With gradients: autodiff of the ring scan would keep every visiting text block (O(B·D) per
  # device); the custom VJP passes them round again instead, so only O(b²) blocks remain.
  n, d = 4096, 256
  zimg, ztxt, weights = inputs(n, d)
  mesh = _mesh(8)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = [jax.device_put(x, sharding) for x in (zimg, ztxt, weights)]
  ring = ring_losses.ring_loss(name, mesh)
  grad = lambda fn: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda zi, zt, w: fn(zi, zt, 10.0, -10.0, w)[0], argnums=(0, 1)))
  ring_mem = grad(ring).lower(*args).compile().memory_analysis().temp_size_in_bytes
  full_mem = grad(full_loss(name)).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert ring_mem * 4 <= full_mem, (ring_mem, full_mem)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_ring_traces_at_a_batch_beyond_int32_pair_counts(name):
  # 46,342 · 46,341 > 2**31 − 1 (padded to 46,344 rows over 8 devices); eval_shape traces the
  # shard_map without running the ring.
  z = jax.ShapeDtypeStruct((46_342, 2), jnp.float32)
  ring = ring_losses.ring_loss(name, _mesh(8))
  loss, metrics = jax.eval_shape(lambda zi, zt: ring(zi, zt, 7.3, -4.1), z, z)
  assert (loss.shape, loss.dtype) == ((), jnp.float32)
  assert {k: (v.shape, v.dtype) for k, v in metrics.items()} == {
      "pos_logit": ((), jnp.float32), "neg_logit": ((), jnp.float32)}


@pytest.mark.parametrize("seed", range(4))
def test_ring_logit_metrics_match_numpy_means_over_seeds(seed):
  rng = np.random.default_rng(200 + seed)
  num, n = int(rng.choice([2, 4, 8])), int(rng.integers(1, 30))
  zimg, ztxt, _ = inputs(n, d=int(rng.integers(2, 9)), seed=seed)
  t, b = float(rng.uniform(1, 20)), float(rng.uniform(-10, 5))
  logits = t * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T + b
  off = ~np.eye(n, dtype=bool)
  for name, shift in (("sigmoid", 0.0), ("softmax", b)):
    _, m = jax.jit(ring_losses.ring_loss(name, _mesh(num)))(zimg, ztxt, t, b)
    np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits)) - shift, rtol=1e-5,
                               atol=1e-5)
    neg = np.mean(logits[off]) - shift if n > 1 else 0.0  # no negatives: 0 / max(0, 1)
    np.testing.assert_allclose(m["neg_logit"], neg, rtol=1e-5, atol=1e-5)
