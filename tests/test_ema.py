"""Parameter EMA (config.ema_decay): the average against a numpy recurrence over the step's own
parameters, training unchanged by it, skipped steps, resume, and which weights are evaluated
and exported."""
import os

import jax
import numpy as np
import pytest

from compiles import count_compiles
from siglip_fair.models import make_model
from siglip_fair.train import checkpoint
from siglip_fair.train.loop import train
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from siglip_fair.train.state import ema_decay_at, eval_params, make_init_fn, make_train_step
from test_train import _config, _train_iter


def test_decay_warmup_closed_form():
  for decay in (0.5, 0.9, 0.99, 0.999):
    n = np.arange(0, 5000)
    want = np.minimum(decay, (1.0 + n) / (10.0 + n))
    np.testing.assert_allclose(np.asarray(ema_decay_at(decay, n)), want, rtol=1e-6)


def _run_steps(ema_decay, batches, nonfinite="stop"):
  config = _config(nonfinite=nonfinite)
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, 100, 3)
  init = make_init_fn(model, tx, batches[0]["image"], batches[0]["text"], ema=ema_decay > 0)
  initial = jax.device_get(jax.jit(init)(jax.random.key_data(jax.random.key(0))))
  mesh = make_mesh({"data": -1})
  shardings = state_shardings(initial, mesh)
  step = make_train_step(model, tx, config.loss, schedule=schedule, state_sharding=shardings,
                         batch_sharding=batch_sharding(mesh), nonfinite=nonfinite,
                         ema_decay=ema_decay)
  state = jax.device_put(initial, shardings)
  states = [initial]
  with count_compiles() as compiles:
    for batch in batches:
      state, _ = step(state, global_batch(batch, mesh))
      states.append(jax.device_get(state))
  return states, len(compiles)


@pytest.fixture(scope="module")
def batches():
  it = _train_iter()
  return [{k: v for k, v in next(it).items() if k != "label"} for _ in range(6)]


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_ema_follows_the_recurrence_and_leaves_training_alone(batches, decay):
  with_ema, compiles = _run_steps(decay, batches)
  plain, _ = _run_steps(0.0, batches)
  assert compiles == 1
  assert all(s.ema_params is None for s in plain)
  for a, b in zip(with_ema, plain):  # the average never feeds back into training
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  ema = jax.tree.map(np.float64, with_ema[0].params)  # starts at the initial weights
  jax.tree.map(np.testing.assert_array_equal, with_ema[0].ema_params, with_ema[0].params)
  for n, s in enumerate(with_ema[1:]):
    d = min(decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.float64(p), ema, s.params)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
                 s.ema_params, ema)
  # After a few updates the average differs from the weights (else the test proves nothing).
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                          with_ema[-1].ema_params, with_ema[-1].params)))
  assert diff > 1e-4


def test_a_skipped_step_leaves_the_average_alone(batches):
  bad = [dict(b) for b in batches[:4]]
  bad[2]["image"] = np.full_like(bad[2]["image"], np.nan)
  states, _ = _run_steps(0.9, bad, nonfinite="skip")
  assert int(states[3].nonfinite_steps) == 1
  jax.tree.map(np.testing.assert_array_equal, states[3].ema_params, states[2].ema_params)
  # The next update is averaged with the weight of the 3rd applied update (n = 2), not the 4th.
  d = min(0.9, 3.0 / 12.0)
  want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, states[3].ema_params, states[4].params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
               states[4].ema_params, want)


def test_bad_decay_is_refused():
  config = _config()
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, 10, 1)
  mesh = make_mesh({"data": -1})
  for decay in (1.0, -0.1):
    with pytest.raises(ValueError, match="ema_decay"):
      make_train_step(model, tx, "sigmoid", schedule=schedule, state_sharding=None,
                      batch_sharding=batch_sharding(mesh), ema_decay=decay)


def test_loop_evaluates_resumes_and_exports_the_average(tmp_path):
  config = _config(total=30, eval_every=10, ckpt_every=10, ema_decay=0.9)
  seen = {}

  def evaluate(params, step):
    seen[step] = jax.device_get(params)
    return {}

  full = jax.device_get(train(config, str(tmp_path / "full"), train_iter=_train_iter(),
                              evaluate_fn=evaluate))
  jax.tree.map(np.testing.assert_array_equal, seen[30], full.ema_params)
  jax.tree.map(np.testing.assert_array_equal, eval_params(full), full.ema_params)
  exported = checkpoint.load_params(str(tmp_path / "full"))
  jax.tree.map(np.testing.assert_array_equal, exported, full.ema_params)
  raw = checkpoint.load_params(str(tmp_path / "full"), ema=False)
  jax.tree.map(np.testing.assert_array_equal, raw, full.params)

  # Stopped at 20 and resumed: the average is checkpointed with the rest, bit for bit.
  part = str(tmp_path / "part")
  train(config, part, train_iter=_train_iter(), stop_after=20)
  resumed = jax.device_get(train(config, part, train_iter=_train_iter()))
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params, full.ema_params)

  # A run without the average cannot silently resume as one that has it.
  plain = str(tmp_path / "plain")
  train(_config(total=30, ckpt_every=10), plain, train_iter=_train_iter(), stop_after=10)
  with pytest.raises(checkpoint.CheckpointError, match="ema_params"):
    train(config, plain, train_iter=_train_iter())
  assert os.listdir(os.path.join(plain, "checkpoints")) == ["10"]
