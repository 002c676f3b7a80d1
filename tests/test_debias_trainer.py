"""The target-model trainer: GroupDRO's jitted step against its definition, one compile per
run, and selection / re-sampling behaviour on a task with a planted shortcut."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from siglip_fair.debias import nets, sampling, tasks, trainer


def _cfg(**kw):
  base = dict(net="small_cnn", net_kwargs=dict(width=8), optimizer="adam", learning_rate=3e-3,
              weight_decay=0.0, momentum=0.9, batch_size=32, steps=60, eval_every="20",
              selection="worst_pseudo_group", tau=0.1, refresh_every=10, probe_per_group=64,
              dro_step_size=0.5, jtt_first_steps=20, jtt_upweight=5.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _batch(n=32, size=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, n).astype(np.int64)
  groups = rng.integers(0, 3, n).astype(np.int64)  # group 3 is absent
  return images, labels, groups


def test_group_dro_step_matches_its_definition():
  net = nets.make_net("small_cnn", 2, width=8)
  tx = optax.sgd(0.1)
  variables = nets.init_variables(net, jax.random.key(0), (8, 8, 3))
  images, labels, groups = _batch()
  q = jnp.array([0.1, 0.2, 0.3, 0.4])
  eta = 0.7
  # Reference: per-example losses at the current weights, then the update written out.
  logits, _ = nets.apply(net, variables, images.astype(np.float32) / 127.5 - 1, train=False)
  losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  group_loss = np.array([losses[groups == k].mean() if np.any(groups == k) else 0.0
                         for k in range(4)])
  q_ref = np.asarray(q) * np.exp(eta * group_loss)
  q_ref /= q_ref.sum()
  grad_ref = jax.grad(lambda p: jnp.sum(jnp.asarray(q_ref) * jnp.stack([
      jnp.where(groups == k, optax.softmax_cross_entropy_with_integer_labels(
          nets.apply(net, {"params": p}, images.astype(np.float32) / 127.5 - 1,
                     train=False)[0], labels), 0.0).sum() / max((groups == k).sum(), 1)
      for k in range(4)])))(variables["params"])
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grad_ref)
  step = trainer.make_train_step(net, tx, 4, eta)
  new_vars, _, new_q, loss = step(jax.tree.map(jnp.copy, variables), tx.init(variables["params"]),
                                  q, images, labels, groups)
  np.testing.assert_allclose(np.asarray(new_q), q_ref, rtol=1e-5)
  assert float(loss) == pytest.approx(float(q_ref @ group_loss), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new_vars["params"], expected)
  # GroupDRO's loss-weighted batch equals the numpy weights of `sampling.dro_weights` when q is
  # renormalised over the present groups.
  w = sampling.dro_weights(q_ref, groups)
  assert w @ losses == pytest.approx(q_ref @ group_loss / q_ref[:3].sum(), rel=1e-5)


def test_erm_step_is_the_mean_cross_entropy_and_compiles_once():
  net = nets.make_net("small_cnn", 2, width=8)
  tx = optax.sgd(0.0)
  variables = nets.init_variables(net, jax.random.key(1), (8, 8, 3))
  opt_state = tx.init(variables["params"])
  step = trainer.make_train_step(net, tx, 4, None)
  q = jnp.full((4,), 0.25)
  for seed in range(3):
    images, labels, groups = _batch(seed=seed)
    logits, _ = nets.apply(net, variables, images.astype(np.float32) / 127.5 - 1, train=False)
    ref = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    variables, opt_state, q, loss = step(variables, opt_state, q, images, labels, groups)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
  assert step._cache_size() == 1


def _digits(split_rows, data):
  rows = split_rows
  groups = data["label"][rows] * 2 + data["colour"][rows]
  return trainer.Split(data["image"][rows], data["label"][rows], groups, groups)


def test_reweighting_methods_beat_erm_on_the_minority_groups():
  """Coloured digits (colour = label for 95 % of training digits): ERM learns the colour, and
  re-sampling by (label, colour) group recovers the minority groups."""
  train_data = tasks.coloured_digits("train", size=16)
  test_data = tasks.coloured_digits("test", size=16)
  n = len(train_data["label"])
  train, val = _digits(np.arange(n - 200), train_data), _digits(np.arange(n - 200, n), train_data)
  test = _digits(np.arange(len(test_data["label"])), test_data)
  cfg = _cfg(steps=300, eval_every="100", selection="last", batch_size=64, tau=1.0,
             refresh_every=25, learning_rate=1e-3, net_kwargs=dict(width=16))
  worst = {}
  for method in ("erm", "clip_debias", "oracle_balanced"):
    result = trainer.train_target(cfg, method, train, val, 0, num_classes=2)
    net = nets.make_net("small_cnn", 2, width=16)
    _, preds = trainer.evaluate(net, result.variables, test.images, test.labels, 64)
    worst[method] = trainer._worst(preds == test.labels, test.groups)
    assert result.selected_step == 300 and [h["step"] for h in result.history] == [100, 200, 300]
  assert worst["clip_debias"] > worst["erm"] + 0.2, worst
  assert worst["oracle_balanced"] > worst["erm"] + 0.2, worst


def test_unknown_method_and_missing_true_groups_are_named():
  data = tasks.coloured_digits("train", size=16)
  split = _digits(np.arange(64), data)
  with pytest.raises(ValueError, match="unknown debias method 'dro'"):
    trainer.train_target(_cfg(), "dro", split, split, 0, num_classes=2)
  blind = trainer.Split(split.images, split.labels, split.groups, None)
  with pytest.raises(ValueError, match="true groups"):
    trainer.train_target(_cfg(), "oracle_balanced", blind, blind, 0, num_classes=2)


def test_resnet18_trains_with_batch_statistics():
  data = tasks.coloured_digits("train", size=16)
  split = _digits(np.arange(128), data)
  cfg = _cfg(net="resnet18", net_kwargs=dict(width=8, small_images=True), steps=4,
             eval_every="2", batch_size=16)
  result = trainer.train_target(cfg, "erm", split, split, 0, num_classes=2)
  init = nets.init_variables(nets.ResNet18(2, width=8, small_images=True), jax.random.key(0),
                             (16, 16, 3))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), result.variables["batch_stats"],
                       init["batch_stats"])
  assert all(jax.tree.leaves(moved))
  assert [h["step"] for h in result.history] == [2, 4]


def test_methods_and_seeds_share_one_compiled_step():
  data = tasks.coloured_digits("train", size=16)
  split = _digits(np.arange(96), data)
  cfg = _cfg(steps=3, eval_every="3", batch_size=16)
  for seed, method in ((0, "erm"), (1, "cluster_uniform"), (2, "clip_debias")):
    trainer.train_target(cfg, method, split, split, seed, num_classes=2)
  net = nets.make_net("small_cnn", 2, width=8)
  step = trainer._cached_step(net, trainer.make_optimizer(cfg), 4, None)
  assert step._cache_size() == 1
