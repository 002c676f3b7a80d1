"""CLIP-debias sampling rules against direct computations from their definitions."""
import numpy as np
import pytest

from siglip_fair.debias import sampling


def test_group_mean_losses_match_a_loop():
  rng = np.random.default_rng(0)
  groups = rng.integers(0, 4, 50)
  groups[groups == 2] = 3  # group 2 is empty
  losses = rng.random(50)
  got = sampling.group_mean_losses(losses, groups, 5)
  for k in range(5):
    members = losses[groups == k]
    if members.size:
      assert got[k] == pytest.approx(members.mean(), rel=1e-12)
    else:
      assert np.isnan(got[k])


def test_loss_aware_probabilities_are_a_tempered_softmax():
  losses = np.array([0.2, 1.5, np.nan, 0.7])
  for tau in (0.05, 0.5, 3.0):
    got = sampling.loss_aware_probabilities(losses, tau)
    e = np.exp(np.array([0.2, 1.5, 0.7]) / tau)
    np.testing.assert_allclose(got[[0, 1, 3]], e / e.sum(), rtol=1e-12)
    assert got[2] == 0
  np.testing.assert_allclose(sampling.loss_aware_probabilities(losses, np.inf),
                             [1 / 3, 1 / 3, 0, 1 / 3])
  # Small τ concentrates on the worst group.
  assert sampling.loss_aware_probabilities(losses, 1e-3)[1] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="tau"):
    sampling.loss_aware_probabilities(losses, 0.0)
  with pytest.raises(ValueError, match="empty"):
    sampling.loss_aware_probabilities(np.full(3, np.nan), 1.0)


def test_example_probabilities_give_group_mass_and_uniform_members():
  groups = np.array([0, 0, 0, 1, 2, 2])
  p_group = np.array([0.5, 0.3, 0.2])
  p = sampling.example_probabilities(groups, p_group)
  for k in range(3):
    assert p[groups == k].sum() == pytest.approx(p_group[k])
    assert np.ptp(p[groups == k]) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="no members"):
    sampling.example_probabilities(groups, np.array([0.5, 0.2, 0.2, 0.1]))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    sampling.group_counts(np.array([0, 2]), 2)


def test_sampler_draws_with_the_given_frequencies():
  p = np.array([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
  sampler = sampling.Sampler(p, seed=0)
  draws = np.concatenate([sampler.draw(1000) for _ in range(100)])
  freq = np.bincount(draws, minlength=6) / draws.size
  assert freq[[0, 2, 5]].sum() == 0  # zero-probability rows are never drawn
  # 5 binomial standard deviations at n = 1e5.
  np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / draws.size))
  # Same seed, same batches; a new distribution keeps the stream going.
  a, b = sampling.Sampler(p, 3), sampling.Sampler(p, 3)
  np.testing.assert_array_equal(a.draw(64), b.draw(64))
  with pytest.raises(ValueError, match="non-negative"):
    sampling.Sampler(np.array([0.5, -0.1]), 0)


def test_jtt_upweights_errors():
  errors = np.array([True, False, False, True])
  p = sampling.jtt_probabilities(errors, 5.0)
  np.testing.assert_allclose(p, np.array([5, 1, 1, 5]) / 12)
  with pytest.raises(ValueError, match="upweight"):
    sampling.jtt_probabilities(errors, 0.5)


def test_dro_weights_reproduce_the_group_weighted_loss():
  rng = np.random.default_rng(1)
  groups = rng.integers(0, 3, 32)  # group 3 absent from the batch
  losses = rng.random(32)
  q = np.array([0.1, 0.2, 0.3, 0.4])
  w = sampling.dro_weights(q, groups)
  present = [k for k in range(4) if np.any(groups == k)]
  expected = sum(q[k] * losses[groups == k].mean() for k in present) / q[present].sum()
  assert w @ losses == pytest.approx(expected, rel=1e-12)
