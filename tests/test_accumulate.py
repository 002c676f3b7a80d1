"""Gradient accumulation (train/accumulate.py): 'cached' against the large batch's own loss and
gradient, 'micro' against per-micro-batch gradients taken by slicing, through the sharded step,
with the ring and chunked losses, and its config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compiles import count_compiles
from siglip_fair.models import make_model
from siglip_fair.train import accumulate
from siglip_fair.train.chunked_losses import chunked_loss
from siglip_fair.train.losses import contrastive_loss
from siglip_fair.train.loop import train
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from siglip_fair.train.state import make_init_fn, make_train_step
from test_train import _config, _train_iter


def _setup(loss_name, seed, batch=32):
  config = _config(loss=loss_name)
  if loss_name == "softmax":
    config.model.t_init, config.model.b_init = 1 / 0.07, None
  model = make_model(config.model)
  it = _train_iter(batch)
  for _ in range(seed):
    next(it)
  data = {k: jnp.asarray(v) for k, v in next(it).items() if k in ("image", "text", "weight")}
  rng = np.random.default_rng(seed)
  data["weight"] = jnp.asarray(rng.uniform(0.2, 1.0, batch), jnp.float32)
  params = model.init(jax.random.key(seed), data["image"][:1], data["text"][:1])["params"]

  def apply_fn(p, image, text, key):
    return model.apply({"params": p}, image, text, train=True, rngs={"dropout": key})

  compute = lambda zi, zt, ex, w: contrastive_loss(loss_name, zi, zt, ex, w)  # noqa: E731
  return apply_fn, compute, params, data


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("loss_name,seed,steps", [("sigmoid", 0, 4), ("sigmoid", 1, 2),
                                                   ("softmax", 2, 4), ("softmax", 3, 8)])
def test_cached_accumulation_is_the_large_batch(loss_name, seed, steps):
  apply_fn, compute, params, data = _setup(loss_name, seed)
  key = jax.random.key(0)

  @jax.jit
  def both(p, d):
    return (accumulate.loss_and_grads(apply_fn, compute, p, d, key),
            accumulate.loss_and_grads(apply_fn, compute, p, d, key, steps=steps, mode="cached"))

  want, got = both(params, data)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  _close(got[3], want[3])
  assert float(got[1]["pos_logit"]) == pytest.approx(float(want[1]["pos_logit"]), rel=1e-5)


@pytest.mark.parametrize("loss_name", ["softmax"])  # the mode does not look at the loss
def test_micro_accumulation_averages_each_micro_batch(loss_name):
  apply_fn, compute, params, data = _setup(loss_name, 3)
  key = jax.random.key(0)
  steps = 4

  def one(p, rows, j):
    zi, zt, ex = apply_fn(p, data["image"][rows], data["text"][rows], jax.random.fold_in(key, j))
    return compute(zi, zt, ex, data["weight"][rows])[0]

  @jax.jit
  def everything(p):
    # The reference slices rows j, j + 4, ... itself and averages plain gradients.
    parts = [jax.value_and_grad(one)(p, np.arange(j, 32, steps), j) for j in range(steps)]
    micro = accumulate.loss_and_grads(apply_fn, compute, p, data, key, steps=steps,
                                      mode="micro")
    return parts, micro, accumulate.loss_and_grads(apply_fn, compute, p, data, key)[3]

  parts, (loss, _, _, grads), full = everything(params)
  np.testing.assert_allclose(loss, np.mean([l for l, _ in parts]), rtol=1e-6)
  _close(grads, jax.tree.map(lambda *g: sum(g) / steps, *[g for _, g in parts]))
  # Not the large batch's gradient: the negatives differ (else the two modes would be one).
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads,
                                          full)))
  assert diff > 1e-4


def test_cached_accumulation_with_the_chunked_loss():
  apply_fn, _, params, data = _setup("sigmoid", 4)
  chunked = chunked_loss("sigmoid", 8)
  compute = lambda zi, zt, ex, w: chunked(zi, zt, ex["t"], ex["b"], w)  # noqa: E731
  key = jax.random.key(0)
  want, got = jax.jit(lambda p: (accumulate.loss_and_grads(apply_fn, compute, p, data, key),
                                 accumulate.loss_and_grads(apply_fn, compute, p, data, key,
                                                           steps=4)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  _close(got[3], want[3])


# 'ring': its shard_map over the split batch is where a sharding mismatch would show; 'full'
# goes through the same sharding constraint (and is checked above without a mesh).
@pytest.mark.parametrize("impl", ["ring"])
def test_sharded_step_with_accumulation_equals_the_plain_step(impl):
  """On 8 devices, 2 steps of batch 64 accumulated over 2 cached micro-batches (4 rows per
  device each) against the plain step: same losses and parameters, one compilation."""
  config = _config(batch_size=64)
  it = _train_iter(64)
  batches = [{k: v for k, v in next(it).items() if k != "label"} for _ in range(2)]
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, 100, 1)
  init = make_init_fn(model, tx, batches[0]["image"], batches[0]["text"])
  initial = jax.device_get(jax.jit(init)(jax.random.key_data(jax.random.key(0))))
  mesh = make_mesh({"data": -1})
  shardings = state_shardings(initial, mesh)
  results = {}
  for steps in (1, 2):
    step = make_train_step(model, tx, "sigmoid", schedule=schedule, state_sharding=shardings,
                           batch_sharding=batch_sharding(mesh), loss_impl=impl,
                           accum_steps=steps)
    state = jax.device_put(initial, shardings)
    losses = []
    with count_compiles() as compiles:
      for batch in batches:
        state, metrics = step(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert len(compiles) == 1
    results[steps] = losses, jax.device_get(state.params)
  np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
  _close(results[2][1], results[1][1], tol=1e-4)  # Adam's normalisation, as in test_train


def test_bad_accumulation_is_refused(tmp_path):
  with pytest.raises(ValueError, match="accum_steps=3 must be >= 1 and split each of the 8"):
    train(_config(accum_steps=3), str(tmp_path / "a"), train_iter=_train_iter())
  with pytest.raises(ValueError, match="accum_mode='big'"):
    train(_config(accum_steps=2, accum_mode="big"), str(tmp_path / "b"),
          train_iter=_train_iter())
