"""model.dtype='bfloat16' (issue 20's acceptance): a tiny two-tower model trained on CPU in bf16
compute tracks the float32 run's loss curve from the same initial parameters on the same
batches, and its parameters and optimizer state stay float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_fair.models import make_model
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from siglip_fair.train.state import make_init_fn, make_train_step
from test_train import _config, _train_iter

STEPS, WINDOW = 80, 10
MESH = make_mesh({"data": -1}, devices=jax.devices()[:1])
# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 3.9e-3 per rounding. Matmul
# inputs and activations are rounded at every layer of both towers, so the loss of one step
# carries a relative error of about u, and the two runs' parameters drift apart by as much per
# update; a window's mean loss then differs by about u relative. Measured on this toy task,
# seeds 0-3: at most 3.6e-3 = 0.9u in any window. 4u = 1.6 % leaves room for that drift while
# a run that stalls or derails in bf16 fails it. (The curve is robust: even float32
# parameters rounded to bf16 after every update stayed within 2.8u here, so that failure is
# checked on the parameters themselves below.)
TOLERANCE = 4 * 2.0**-8


def _trainer(dtype, example):
  """(init(seed) -> state, step) of the test_train toy config in `dtype`, compiled once."""
  config = _config()
  config.model.dtype = dtype
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, STEPS, STEPS // 10)
  init = jax.jit(make_init_fn(model, tx, example["image"], example["text"]))
  initial = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
  shardings = state_shardings(initial, MESH)
  step = make_train_step(model, tx, config.loss, schedule=schedule, state_sharding=shardings,
                         batch_sharding=batch_sharding(MESH))
  return lambda seed: jax.device_put(init(jax.random.key_data(jax.random.key(seed))),
                                     shardings), step


def _train(trainer, seed, batches):
  """Loss per step, initial and final state of one run over `batches`."""
  init, step = trainer
  state = init(seed)
  initial = jax.device_get(state)  # before the first step donates its buffers
  losses = []
  for batch in batches:
    state, metrics = step(state, global_batch(batch, MESH))
    losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses), np.float64), initial, state


@pytest.fixture(scope="module")
def batches():
  it = _train_iter(batch_size=32)
  return [{k: v for k, v in next(it).items() if k != "label"} for _ in range(STEPS)]


@pytest.fixture(scope="module")
def trainers(batches):
  return {dtype: _trainer(dtype, batches[0]) for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_training_tracks_fp32(batches, trainers, seed):
  f32, init32, _ = _train(trainers["float32"], seed, batches)
  bf16, init16, end16 = _train(trainers["bfloat16"], seed, batches)

  # The compute dtype leaves the initialisation alone: both runs start from the same params.
  jax.tree.map(np.testing.assert_array_equal, init16.params, init32.params)
  # Parameters and optimizer state stay float32 (only activations are bf16), in dtype and in
  # value: of the entries that training moved, hardly any sits on the bf16 grid (a float32
  # number does with probability 2^-16), as every one would if updates were rounded to bf16.
  for tree in (end16.params, end16.opt_state):
    floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}, floats
  end = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(end16.params))])
  start = np.concatenate([np.ravel(x) for x in jax.tree.leaves(init16.params)])
  moved = end[end != start]
  on_grid = np.mean(moved.astype(jnp.bfloat16).astype(np.float32) == moved)
  assert moved.size > 0.9 * end.size and on_grid < 0.01, (moved.size, end.size, on_grid)
  # The bf16 run really computes in bf16 (its step multiplies bf16 matrices, the float32 one's
  # does not), and its curve is not the float32 one bit for bit.
  hlo = {d: t[1].lower(end16, global_batch(batches[0], MESH)).as_text()
         for d, t in trainers.items()}
  assert "bf16" in hlo["bfloat16"] and "bf16" not in hlo["float32"]
  assert np.any(bf16 != f32)

  assert np.all(np.isfinite(bf16)) and np.all(np.isfinite(f32))
  w16, w32 = (c.reshape(-1, WINDOW).mean(axis=1) for c in (bf16, f32))
  # Both learn: the last window's mean loss is well below the first's.
  assert w32[-1] < 0.5 * w32[0] and w16[-1] < 0.5 * w16[0], (w32, w16)
  relative = np.abs(w16 - w32) / w32
  assert relative.max() <= TOLERANCE, relative
