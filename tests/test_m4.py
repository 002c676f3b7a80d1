"""M4 core: factored algebra vs brute force, special cases (Reweighing, raking), keep masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from siglip_fair.balance import dual, m4, qp, stream


def _examples(seed=0, n=64, m=2, c=3, p=2):
  ann, pi = qp.random_instance(seed, n, m, c, p, utility=True)
  cfg = m4.default_config()
  cfg.use_proxies = cfg.use_utility = True
  return ann, pi, m4.prepare(ann, cfg)


def _flat_b(ex, pi):
  b = m4.bias_vectors(*(np.asarray(x, np.float64) for x in ex[:4]), np.asarray(pi, np.float64))
  return np.concatenate([b[k].reshape(len(ex.u), -1) for k in m4.BLOCKS], axis=1)


def _tree(rng, ex, lead=()):
  m, c, p = ex.s.shape[1], ex.y.shape[1], ex.w.shape[1]
  return dict(rep=rng.normal(size=lead + (m,)), assoc=rng.normal(size=lead + (m, c)),
              proxy=rng.normal(size=lead + (m, p)))


def test_factored_contractions_match_materialised_bias_vectors():
  _, pi, ex = _examples()
  bmat = _flat_b(ex, pi)
  rng = np.random.default_rng(1)
  lam, q = _tree(rng, ex), rng.random(len(ex.u))
  d = (ex.s - pi) * ex.known
  np.testing.assert_allclose(m4.b_dot(jax.tree.map(jnp.float32, lam), d, ex.y, ex.w),
                             bmat @ qp.flatten(lam), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(qp.flatten(m4.moment_sums(jnp.float32(q), d, ex.y, ex.w)),
                             bmat.T @ q, rtol=1e-5, atol=1e-5)
  ann = dict(s=ex.s, known=ex.known, y=ex.y, w=ex.w)
  np.testing.assert_allclose(qp.flatten(m4.constraint_moments(q, ann, pi)),
                             bmat.T @ q / len(q), rtol=1e-6, atol=1e-9)


def test_q_from_duals_minimises_each_examples_lagrangian():
  _, pi, ex = _examples(n=24)
  rng = np.random.default_rng(2)
  v = jax.tree.map(lambda x: np.abs(x).astype(np.float32), _tree(rng, ex, (2,)))
  mu, eta = 0.1, 0.9
  q = m4.q_from_duals(dict(v=v, mu=mu), jax.tree.map(jnp.asarray, ex), pi, eta)
  a = np.concatenate([_flat_b(ex, pi), -_flat_b(ex, pi)], axis=1)
  vta = a @ np.concatenate([qp.flatten({k: x[0] for k, x in v.items()}),
                            qp.flatten({k: x[1] for k, x in v.items()})])
  for i in range(len(q)):  # ½(q − η)² − u q + µ q + vᵀa q over q ∈ [0, 1]
    f = lambda x: 0.5 * (x - eta) ** 2 - ex.u[i] * x + mu * x + vta[i] * x
    ref = optimize.minimize_scalar(f, bounds=(0, 1), method="bounded", options=dict(xatol=1e-9))
    assert q[i] == pytest.approx(ref.x, abs=1e-5)


def _consts(ex, pi, eps=0.01, cap=1e3):
  eps_tree = jax.tree.map(lambda x: np.full(x.shape, eps, np.float32),
                          m4.moment_sums(jnp.ones(len(ex.u)), ex.s, ex.y, ex.w))
  consts = m4.Consts(jnp.asarray(pi), jnp.float32(0.9), eps_tree, None, jnp.float32(cap))
  layout = dual.make_layout(len(ex.u), m4.default_config())
  bex, mask = dual.to_blocks(ex, layout)
  return consts._replace(precond=dual.jacobi(bex, mask, consts.pi, layout=layout))


def test_dual_step_is_spec_update_and_ignores_padding():
  _, pi, ex = _examples(n=40)
  consts = _consts(ex, pi)
  rng = np.random.default_rng(3)
  v = jax.tree.map(lambda x: np.abs(x).astype(np.float32) * 0.3, _tree(rng, ex, (2,)))
  state = m4.DualState(v, jnp.float32(0.05), v, jnp.float32(0.05), jnp.int32(7), jnp.int32(0))
  lr = 0.2
  new = dual.dual_step(state, jax.tree.map(jnp.asarray, ex), jnp.ones(40), consts, lr,
                     jnp.bool_(True))
  # Brute force: q, then v ← clip(v + lr·P·(mean(q a) − ε), 0, V) on the materialised a.
  b = _flat_b(ex, pi)
  vf = np.stack([qp.flatten({k: x[j] for k, x in v.items()}) for j in (0, 1)])
  q = np.clip(0.9 + ex.u - 0.05 - b @ (vf[0] - vf[1]), 0, 1)
  grad = np.stack([b.T @ q / 40, -b.T @ q / 40]) - 0.01
  p = qp.flatten(jax.tree.map(np.asarray, consts.precond))
  want = np.clip(vf + lr * p * grad, 0, 1e3)
  got = np.stack([qp.flatten({k: np.asarray(x[j]) for k, x in new.v.items()}) for j in (0, 1)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(new.mu) == pytest.approx(0.05 + lr * (q.mean() - 0.9), abs=1e-6)
  # First averaged iterate: the average is the iterate itself.
  for a, b_ in zip(jax.tree.leaves(new.v_avg), jax.tree.leaves(new.v)):
    np.testing.assert_allclose(a, b_)
  # The same batch padded with junk rows under mask 0 gives the same step.
  junk = jax.tree.map(lambda x: np.concatenate([x, np.ones_like(x[:9])]), ex)
  padded = dual.dual_step(state, jax.tree.map(jnp.asarray, junk),
                        jnp.concatenate([jnp.ones(40), jnp.zeros(9)]), consts, lr,
                        jnp.bool_(True))
  for a, b_ in zip(jax.tree.leaves(padded), jax.tree.leaves(new)):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_curvature_is_largest_eigenvalue_of_scaled_gram():
  _, pi, ex = _examples(n=300, m=3, c=4, p=2)
  consts = _consts(ex, pi)
  cfg = m4.default_config()
  cfg.optim.batch_size = 64
  layout = dual.make_layout(300, cfg)
  bex, mask = dual.to_blocks(ex, layout)
  lmax = dual.curvature(bex, mask, consts, layout=layout, iters=200)
  a = np.concatenate([np.ones((300, 1)), _flat_b(ex, pi)], axis=1)
  scale = np.sqrt(np.concatenate([[1.0], qp.flatten(jax.tree.map(np.asarray, consts.precond))]))
  gram = (a * scale).T @ (a * scale) / 300
  assert float(lmax) == pytest.approx(np.linalg.eigvalsh(gram)[-1], rel=1e-3)


def _balance(ann, **overrides):
  cfg = m4.default_config()
  for k, v in overrides.items():
    cfg[k] = v
  return m4.balance(ann, cfg, jax.random.key(0))


def test_reweighing_special_case_makes_group_independent_of_label():
  rng = np.random.default_rng(4)
  n = 4000
  s = (rng.random(n) < 0.3).astype(np.float32)
  y = (rng.random(n) < np.where(s == 1, 0.5, 0.25)).astype(np.float32)
  ann = dict(s=s[:, None], known=np.ones(n, np.float32), y=y[:, None],
             w=np.zeros((n, 0), np.float32), u=np.zeros(n, np.float32))
  # η = 0.6: with only 10 % to drop, no q in [0, 1] could undo this much association.
  result = _balance(ann, eps_rep=0.0, eps_assoc=0.0, eta=0.6)
  assert result.card["verdict"] == "feasible"
  q = result.q.astype(np.float64)

  def table(weight):  # P(s = a, y = b) under the weights
    return np.array([[np.sum(weight * (s == a) * (y == b)) for b in (0, 1)]
                     for a in (0, 1)]) / weight.sum()

  gap = lambda t: np.abs(t - np.outer(t.sum(1), t.sum(0))).max()
  assert gap(table(np.ones(n))) > 0.02  # dependent before ...
  assert gap(table(q)) < 1e-3           # ... independent after,
  assert table(q).sum(1)[1] == pytest.approx(s.mean(), abs=1e-3)  # with P(s) unchanged.
  assert q.mean() == pytest.approx(0.6, abs=1e-3)


def test_prevalence_only_on_disjoint_groups_hits_targets():  # raking
  rng = np.random.default_rng(5)
  n = 3000
  g = rng.choice(3, n, p=[0.5, 0.3, 0.2])
  known = (rng.random(n) < 0.7).astype(np.float32)
  s = np.eye(3, dtype=np.float32)[g] * known[:, None]
  ann = dict(s=s, known=known, y=np.zeros((n, 2), np.float32), u=np.zeros(n, np.float32))
  target = [0.45, 0.33, 0.22]
  result = _balance(ann, pi=target, eps_rep=0.0, use_labels=False, eta=0.85)
  assert result.card["verdict"] == "feasible"
  q = result.q
  achieved = (q[:, None] * s).sum(0) / (q * known).sum()
  np.testing.assert_allclose(achieved, target, atol=1e-3)


def test_budget_range_and_keep_mask_is_bernoulli():
  ann, pi = qp.random_instance(6, 2000, 2, 5)
  result = _balance(ann, pi=pi.tolist())
  q = result.q
  assert q.dtype == np.float32 and result.keep.dtype == np.bool_
  assert q.min() >= 0 and q.max() <= 1 and q.mean() == pytest.approx(0.9, abs=1e-3)
  assert abs(result.keep.mean() - q.mean()) < 4 * np.sqrt((q * (1 - q)).sum()) / len(q)
  np.testing.assert_array_equal(stream.keep_mask(q, jax.random.key(0)), result.keep)
  assert (stream.keep_mask(q, jax.random.key(1)) != result.keep).any()
  # Each probability is hit at its own rate: 20k draws per value, 4σ bounds.
  values = np.array([0.0, 0.05, 0.5, 0.93, 1.0], np.float32)
  draws = stream.keep_mask(np.repeat(values, 20000), jax.random.key(2)).reshape(5, -1).mean(1)
  np.testing.assert_allclose(draws, values, atol=4 * np.sqrt(0.25 / 20000))
  assert draws[0] == 0 and draws[-1] == 1


def test_infeasible_target_gives_verdict_naming_it():
  rng = np.random.default_rng(7)
  n = 2000
  s = (rng.random((n, 2)) < [0.1, 0.5]).astype(np.float32)
  ann = dict(s=s, known=np.ones(n, np.float32), y=np.zeros((n, 1), np.float32),
             u=np.zeros(n, np.float32))
  result = _balance(ann, pi=[0.9, 0.5], eta=0.95, use_labels=False)
  card = result.card
  assert card["verdict"] == "infeasible"
  assert card["binding"][0] == card["largest_violation"]["name"] == "rep[g0]"
  assert np.all(np.isfinite(result.q))

  def numbers(x):
    if isinstance(x, dict):
      return [z for v in x.values() for z in numbers(v)]
    if isinstance(x, list):
      return [z for v in x for z in numbers(v)]
    return [x] if isinstance(x, (int, float)) else []
  assert np.all(np.isfinite(numbers(card)))


def test_known_per_example_equals_known_per_group_broadcast():
  ann, pi = qp.random_instance(8, 1500, 2, 4)
  wide = dict(ann, known=np.repeat(ann["known"][:, None], 2, axis=1))
  np.testing.assert_array_equal(_balance(ann).q, _balance(wide).q)


@pytest.mark.parametrize("override, field", [
    (dict(eta=0.0), "eta"), (dict(eta=1.5), "eta"), (dict(pi=[0.5]), "pi"),
    (dict(pi=[0.5, 1.5]), "pi"), (dict(tolerance="rel"), "tolerance"), (dict(V=0.0), "V"),
    (dict(eps_rep=-1.0), "eps_rep")])
def test_bad_config_is_a_clear_error(override, field):
  ann, _ = qp.random_instance(9, 50, 2, 3)
  with pytest.raises(ValueError, match=field):
    _balance(ann, **override)


@pytest.mark.parametrize("change, field", [
    (lambda a: dict(a, y=a["y"][:10]), "y"), (lambda a: dict(a, known=a["known"][:, None]),
                                              "known"),
    (lambda a: dict(a, s=a["s"] * 2), "s"), (lambda a: {k: a[k] for k in ("s", "known")}, "y")])
def test_bad_annotations_are_a_clear_error(change, field):
  ann, _ = qp.random_instance(9, 50, 2, 3)
  with pytest.raises(ValueError, match=f"'{field}'"):
    _balance(change(ann))


def test_shuffles_are_per_block_permutations_seeded_by_epoch():
  cfg = m4.default_config()
  cfg.optim.batch_size = 64
  layout = dual.make_layout(1000, cfg)
  orders = np.asarray(dual.shuffles(5, 3, layout))
  assert orders.shape == (3, layout.blocks, layout.rows)
  assert all(np.array_equal(np.sort(o), np.arange(layout.rows)) for o in orders.reshape(
      -1, layout.rows))
  assert not np.array_equal(orders[0], orders[1])  # a new order every epoch
  # The first two epochs of a longer run are the same draws: seeded by (seed, epoch) alone.
  np.testing.assert_array_equal(np.asarray(dual.shuffles(5, 2, layout)), orders[:2])
