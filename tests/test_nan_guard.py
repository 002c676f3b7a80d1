"""NaN/Inf guard of training (config.nonfinite): 'stop' ends at the first bad step without
saving it, 'skip' drops that step's update bit for bit and trains on; one compilation either
way."""
import os

import jax
import numpy as np
import pytest

from siglip_fair.models import make_model
from siglip_fair.train import checkpoint
from siglip_fair.train.loop import NonFiniteError, train
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.progress import read_metrics
from siglip_fair.train.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from siglip_fair.train.state import make_init_fn, make_train_step
from compiles import count_compiles
from test_train import _config, _train_iter
from wrapped_iterator import WrappedIterator

BAD_STEP = 7  # the step that reads the poisoned batch


class PoisonedIterator(WrappedIterator):
  """The toy iterator of test_train.py, with +inf in the images of the batch read at `bad_step`
  (the loop peeks at one batch and rewinds, so positions count from the start)."""

  def __init__(self, bad_step=BAD_STEP):
    super().__init__(_train_iter())
    self._bad = bad_step

  def on_batch(self, batch, position):
    if position + 1 == self._bad:
      batch = dict(batch, image=np.full_like(batch["image"], np.inf))
    return batch


def test_skip_policy_keeps_state_bit_for_bit_in_one_compilation():
  config = _config()
  it = PoisonedIterator(bad_step=2)
  batches = [{k: v for k, v in next(it).items() if k != "label"} for _ in range(3)]
  model = make_model(config.model)
  tx, schedule = make_optimizer(config.optim, 100, 10)
  init = make_init_fn(model, tx, batches[0]["image"], batches[0]["text"])
  mesh = make_mesh({"data": -1})
  initial = jax.device_get(jax.jit(init)(jax.random.key_data(jax.random.key(0))))
  shardings = state_shardings(initial, mesh)
  state = jax.device_put(initial, shardings)
  step = make_train_step(model, tx, config.loss, schedule=schedule, state_sharding=shardings,
                         batch_sharding=batch_sharding(mesh), nonfinite="skip")
  with count_compiles() as compiles:
    seen = []
    for batch in batches:
      before = jax.device_get(state)
      state, metrics = step(state, global_batch(batch, mesh))
      seen.append((before, jax.device_get(state), jax.device_get(metrics)))
  assert len(compiles) == 1  # a count of XLA compilations
  assert [int(m["nonfinite"]) for _, _, m in seen] == [0, 1, 0]
  assert [int(m["nonfinite_steps"]) for _, _, m in seen] == [0, 1, 1]
  assert not np.isfinite(seen[1][2]["loss"])
  before, after, _ = seen[1]
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  assert int(after.step) == 2 and int(after.nonfinite_steps) == 1
  # The next good step updates, to finite values (the first step's lr is 0: warm-up).
  before, after, _ = seen[2]
  assert not np.array_equal(after.params["img"]["embedding"]["kernel"],
                            before.params["img"]["embedding"]["kernel"])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))
  # The lr logged is the one applied: optax's schedule counts only applied updates.
  np.testing.assert_allclose(seen[2][2]["lr"], schedule(1), rtol=1e-6)
  with pytest.raises(ValueError, match="nonfinite='ignore'"):
    make_train_step(model, tx, config.loss, schedule=schedule, state_sharding=shardings,
                    batch_sharding=batch_sharding(mesh), nonfinite="ignore")


def test_stop_policy_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  # Steps 5 and 10 log, 4 and 8 save: the bad step 7 is neither, so the loop must look at the
  # flags it kept on the device before it saves step 8.
  config = _config(total=12, log_every=5, ckpt_every=4, eval_every=1000)
  with pytest.raises(NonFiniteError) as error:
    train(config, str(tmp_path), train_iter=PoisonedIterator())
  message = str(error.value)
  print(message)
  assert isinstance(error.value, ValueError)  # the CLI reports ValueErrors and exits 1
  assert message.startswith(f"training: loss is nan at step {BAD_STEP} (grad_norm nan")
  assert f"the last good checkpoint is step 4 in {tmp_path}" in message
  assert "nonfinite='skip'" in message
  assert checkpoint.latest_step(str(tmp_path)) == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [5]


def test_skip_policy_trains_on_and_counts_skipped_steps(tmp_path):
  config = _config(total=10, log_every=1, ckpt_every=5, eval_every=1, nonfinite="skip")
  snapshots = {}

  def evaluate(params, step):
    snapshots[step] = jax.device_get(params)
    return {}

  state = train(config, str(tmp_path), train_iter=PoisonedIterator(), evaluate_fn=evaluate)
  assert int(state.step) == 10 and int(state.nonfinite_steps) == 1
  jax.tree.map(np.testing.assert_array_equal, snapshots[BAD_STEP], snapshots[BAD_STEP - 1])
  kernel = lambda s: snapshots[s]["img"]["embedding"]["kernel"]  # noqa: E731
  assert not np.array_equal(kernel(BAD_STEP + 1), kernel(BAD_STEP))  # training went on
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(snapshots[10]))
  records = {r["step"]: r for r in read_metrics(str(tmp_path / "metrics.jsonl"))}
  assert [records[s]["nonfinite"] for s in range(1, 11)] == [0] * 6 + [1] + [0] * 3
  assert [records[s]["nonfinite_steps"] for s in (6, 7, 10)] == [0, 1, 1]
  assert records[BAD_STEP]["loss"] == "nan"  # JSON has no NaN: logged as a string
  # The count is part of the checkpointed state: a finished workdir restores it.
  restored = train(config, str(tmp_path), train_iter=PoisonedIterator())
  assert int(restored.nonfinite_steps) == 1
