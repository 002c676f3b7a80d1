"""SigLIP / CLIP losses against brute-force numpy loops (value, metrics and gradients)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from siglip_fair.train.losses import contrastive_loss, sigmoid_loss, softmax_loss


def _embeddings(n=8, d=5, seed=0):
  rng = np.random.default_rng(seed)
  zimg, ztxt = rng.normal(size=(2, n, d))
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  weights = rng.uniform(0.2, 2.0, size=n)
  return zimg, ztxt, weights


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _np_sigmoid(zimg, ztxt, t, b, w):
  """Loop reference: loss and d loss / d (zimg, ztxt, t, b) in float64."""
  n = len(zimg)
  loss, gi, gt, dt, db = 0.0, np.zeros_like(zimg), np.zeros_like(ztxt), 0.0, 0.0
  for i in range(n):
    for j in range(n):
      label = 1.0 if i == j else -1.0
      dot = float(zimg[i] @ ztxt[j])
      logit = t * dot + b
      loss -= w[i] * _log_sigmoid(label * logit) / n
      g = -w[i] * label * _sigmoid(-label * logit) / n  # d loss / d logit_ij
      gi[i] += g * t * ztxt[j]
      gt[j] += g * t * zimg[i]
      dt += g * dot
      db += g
  return loss, (gi, gt, dt, db)


def _np_softmax(zimg, ztxt, t, w):
  n = len(zimg)
  logits = np.array([[t * float(zimg[i] @ ztxt[j]) for j in range(n)] for i in range(n)])
  loss, glog = 0.0, np.zeros((n, n))
  for i in range(n):
    row = np.exp(logits[i] - logits[i].max())
    row /= row.sum()
    col = np.exp(logits[:, i] - logits[:, i].max())
    col /= col.sum()
    loss += w[i] * 0.5 * (-math.log(row[i]) - math.log(col[i])) / n
    for j in range(n):
      delta = 1.0 if i == j else 0.0
      glog[i, j] += w[i] * 0.5 * (row[j] - delta) / n   # image i's cross-entropy over texts
      glog[j, i] += w[i] * 0.5 * (col[j] - delta) / n   # text i's cross-entropy over images
  gi = t * glog @ ztxt
  gt = t * glog.T @ zimg
  dt = float(np.sum(glog * logits) / t)
  return loss, (gi, gt, dt)


@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_loss_matches_loops(weighted):
  zimg, ztxt, w = _embeddings()
  t, b = 7.0, -3.0
  weights = w if weighted else np.ones(len(w))
  ref_loss, ref_grads = _np_sigmoid(zimg, ztxt, t, b, weights)
  weights_arg = jnp.asarray(w, jnp.float32) if weighted else None
  fn = lambda zi, zt, t_, b_: sigmoid_loss(zi, zt, t_, b_, weights_arg)[0]  # noqa: E731
  args = [jnp.asarray(a, jnp.float32) for a in (zimg, ztxt, t, b)]
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_loss_matches_loops(weighted):
  zimg, ztxt, w = _embeddings(seed=1)
  t = 1 / 0.07
  weights = w if weighted else np.ones(len(w))
  ref_loss, ref_grads = _np_softmax(zimg, ztxt, t, weights)
  weights_arg = jnp.asarray(w, jnp.float32) if weighted else None
  fn = lambda zi, zt, t_: softmax_loss(zi, zt, t_, weights_arg)[0]  # noqa: E731
  args = [jnp.asarray(a, jnp.float32) for a in (zimg, ztxt, t)]
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_metrics_are_mean_positive_and_negative_logits():
  zimg, ztxt, _ = _embeddings(n=6)
  t, b = 3.0, -1.0
  logits = t * zimg @ ztxt.T + b
  off = ~np.eye(6, dtype=bool)
  _, m = sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b)
  np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits)), rtol=1e-5)
  np.testing.assert_allclose(m["neg_logit"], np.mean(logits[off]), rtol=1e-5)
  _, m = softmax_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t)
  np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits - b)), rtol=1e-5)


def test_one_hot_weight_selects_that_images_row():
  zimg, ztxt, _ = _embeddings(n=5)
  t, b = 4.0, -2.0
  weights = np.zeros(5)
  weights[3] = 1.0
  got, _ = sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b, jnp.asarray(weights))
  row = [-_log_sigmoid((1.0 if j == 3 else -1.0) * (t * zimg[3] @ ztxt[j] + b)) for j in range(5)]
  np.testing.assert_allclose(got, sum(row) / 5, rtol=1e-5)


def test_sharded_inputs_give_the_same_loss():
  zimg, ztxt, w = _embeddings(n=16, d=4, seed=2)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  put = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), sharding)  # noqa: E731
  fn = jax.jit(lambda zi, zt, w_: contrastive_loss("sigmoid", zi, zt, {"t": 5.0, "b": -5.0}, w_)[0])
  np.testing.assert_allclose(fn(put(zimg), put(ztxt), put(w)),
                             _np_sigmoid(zimg, ztxt, 5.0, -5.0, w)[0], rtol=1e-5)


def test_bad_inputs_raise():
  z = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="same shape"):
    sigmoid_loss(z, jnp.zeros((5, 3)), 1.0, 0.0)
  with pytest.raises(ValueError, match="weights"):
    softmax_loss(z, z, 1.0, weights=jnp.ones(3))
  with pytest.raises(ValueError, match="config.loss"):
    contrastive_loss("hinge", z, z, {"t": 1.0, "b": 0.0})


# 46,342 · 46,341 > 2**31 − 1: the first batch whose negative count overflows int32.
BIG = 46_342


@pytest.mark.parametrize("n", [0, 1, 2, 3, 46_341, BIG, 65_536, 10**6, 2**31])
def test_pair_count_is_the_exact_count_as_a_float(n):
  from siglip_fair.train.losses import _pair_count  # pylint: disable=g-import-not-at-top
  exact = max(n * (n - 1), 1)  # Python ints never overflow
  got = _pair_count(n)
  assert isinstance(got, float) and got == float(exact)
  # The traced form (the ring counts valid rows as an array) agrees to float32 rounding.
  np.testing.assert_allclose(float(_pair_count(jnp.float32(n))), exact, rtol=2e-7)
  assert _pair_count(np.int64(n)) == float(exact)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_full_losses_trace_at_a_batch_beyond_int32_pair_counts(name):
  # eval_shape traces the loss without allocating the [B, B] logits (8.6 GB at this size); the
  # count used to be parsed as an int32 divisor and overflow while tracing.
  z = jax.ShapeDtypeStruct((BIG, 2), jnp.float32)
  loss, metrics = jax.eval_shape(
      lambda zi, zt: contrastive_loss(name, zi, zt, {"t": 1.0, "b": 0.0}), z, z)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert {k: (v.shape, v.dtype) for k, v in metrics.items()} == {
      "pos_logit": ((), jnp.float32), "neg_logit": ((), jnp.float32)}


@pytest.mark.parametrize("seed", range(6))
def test_logit_metrics_match_numpy_means_over_seeds(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 40))
  zimg, ztxt, _ = _embeddings(n=n, d=int(rng.integers(2, 9)), seed=seed)
  t, b = float(rng.uniform(1, 20)), float(rng.uniform(-10, 5))
  logits = t * zimg @ ztxt.T + b  # float64
  off = ~np.eye(n, dtype=bool)
  neg = np.mean(logits[off]) if n > 1 else 0.0  # B = 1 has no negatives: 0 / max(0, 1)
  zi, zt = jnp.asarray(zimg, jnp.float32), jnp.asarray(ztxt, jnp.float32)
  for fn, shift in ((lambda: sigmoid_loss(zi, zt, t, b), 0.0),
                    (lambda: softmax_loss(zi, zt, t), b)):
    _, m = fn()
    np.testing.assert_allclose(m["pos_logit"], np.mean(np.diag(logits)) - shift, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(m["neg_logit"], neg - shift * (n > 1), rtol=1e-5, atol=1e-5)
