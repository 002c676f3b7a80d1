"""RB, AB, attribute accuracy and data-level bias on planted data, against
brute-force loops and hand counts."""
import warnings

import numpy as np
import pytest

from siglip_fair.evaluate import bias, data_bias
from siglip_fair.evaluate.bootstrap import bootstrap_ci

D = 8


def _basis(i):
  return np.eye(D, dtype=np.float32)[i]


def _image(rng, components):
  """A unit vector with the given {axis: value} plus small noise elsewhere."""
  x = np.zeros(D, np.float32)
  x[6:] = 0.1 * rng.normal(size=D - 6)
  for axis, value in components.items():
    x[axis] = value
  return x / np.linalg.norm(x)


def test_representation_bias_planted_70_percent_with_ties():
  rng = np.random.default_rng(0)
  # 60 prefer "man" (axis 0), 20 tie (count half), 20 prefer "woman" (axis 1):
  # share = 0.6 + 0.5 * 0.2 = 0.7 -> RB = 0.2.
  plan = [(0.9, 0.2)] * 60 + [(0.5, 0.5)] * 20 + [(0.1, 0.7)] * 20
  img = np.stack([_image(rng, {0: a, 1: b}) for a, b in rng.permutation(plan)])
  prefer = bias.prefers_first(img, _basis(0), _basis(1))
  loop = [1.0 if x[0] > x[1] else 0.5 if x[0] == x[1] else 0.0 for x in img]
  np.testing.assert_array_equal(prefer, loop)
  assert bias.representation_bias(prefer) == pytest.approx(0.2)
  assert bias.representation_bias(1 - prefer) == pytest.approx(-0.2)


def _planted_people(rng):
  """Women prefer pair 0's first occupation 75 %, men 25 %; pair 1 50/50."""
  rows = []
  for gender, n, k0, k1 in ((1, 40, 30, 20), (0, 60, 15, 30)):
    for i in range(n):
      first0, first1 = i < k0, i < k1
      rows.append((gender, _image(rng, {2: float(first0), 3: float(not first0),
                                        4: float(first1), 5: float(not first1)})))
  order = rng.permutation(len(rows))
  gender = np.array([rows[i][0] for i in order])
  img = np.stack([rows[i][1] for i in order])
  first = np.stack([_basis(2), _basis(4)])
  second = np.stack([_basis(3), _basis(5)])
  return img, gender, first, second


def test_association_bias_planted_gaps_match_loops():
  img, gender, first, second = _planted_people(np.random.default_rng(1))
  prefer = bias.prefers_first(img, first, second)
  assert prefer.shape == (100, 2)
  gaps, mean_abs = bias.association_bias(prefer, gender, 1, 0)
  np.testing.assert_allclose(gaps, [0.5, 0.0], atol=1e-6)
  assert mean_abs == pytest.approx(0.25)
  for p in range(2):
    rate = {g: np.mean([float(img[n] @ first[p] > img[n] @ second[p])
                        for n in range(100) if gender[n] == g]) for g in (0, 1)}
    assert gaps[p] == pytest.approx(rate[1] - rate[0])


def test_preference_probability_is_the_two_way_softmax():
  img, gender, first, second = _planted_people(np.random.default_rng(5))
  for t in (1.0, 10.0, 1e4):  # 1e4: exp(t·sim) overflows float64; the probability must not
    prob = bias.preference_probability(img, first, second, t)
    assert prob.shape == (100, 2) and prob.dtype == np.float32
    for n in range(0, 100, 7):
      for p in range(2):
        logits = t * np.array([img[n] @ first[p], img[n] @ second[p]], np.float64)
        softmax = 1.0 / (1.0 + np.exp(np.clip(logits[1] - logits[0], -700, 700)))
        assert prob[n, p] == pytest.approx(softmax, abs=1e-6)
  # A tie is an even split; t -> inf recovers the hard preference.
  assert bias.preference_probability(img[:1], first[0], first[0], 5.0)[0] == 0.5
  np.testing.assert_array_equal(np.round(bias.preference_probability(img, first, second, 1e6)),
                                bias.prefers_first(img, first, second))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    bias.preference_probability(img, first, second, 0.0)


def test_probability_ab_measures_size_where_the_share_only_sees_the_sign():
  # Near-identical images: a small group direction g·e_6 on top of a shared content vector.
  # Every woman prefers the first prompt and every man the second, so the share-based AB is
  # 100 % however small g is; the probability-based one is the closed-form sigmoid gap.
  t, g = 10.0, 0.01
  content = np.array([0.6, 0.8, 0, 0, 0, 0, 0, 0])
  gender = np.repeat([0, 1], 50)
  img = np.stack([content + (1 if k else -1) * g * _basis(6) for k in gender])
  first, second = _basis(0) + 0.5 * _basis(6), _basis(0) - 0.5 * _basis(6)
  first, second = first[None] / np.linalg.norm(first), second[None] / np.linalg.norm(second)
  share = bias.association_bias(bias.prefers_first(img, first, second), gender, 1, 0)[1]
  prob = bias.association_bias(
      bias.preference_probability(img, first, second, t), gender, 1, 0)[1]
  gap = g / np.linalg.norm(_basis(0) + 0.5 * _basis(6))  # sim(first) − sim(second) for a woman
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  assert share == pytest.approx(1.0)  # percent / 100
  assert prob == pytest.approx(sigmoid(t * gap) - sigmoid(-t * gap), rel=1e-4)
  assert prob < 0.05  # vs the share's 1.0


def test_association_bias_empty_group_is_nan_without_warnings():
  prefer = np.ones((5, 3), np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    gaps, mean_abs = bias.association_bias(prefer, np.zeros(5, int), 1, 0)
  assert np.all(np.isnan(gaps)) and np.isnan(mean_abs)


def test_association_bias_vectorises_over_bootstrap_replicates():
  img, gender, first, second = _planted_people(np.random.default_rng(2))
  prefer = bias.prefers_first(img, first, second)
  idx = np.random.default_rng(3).integers(0, 100, (6, 100))
  batched, batched_mean = bias.association_bias(prefer[idx], gender[idx], 1, 0)
  for b in range(6):
    gaps, mean_abs = bias.association_bias(prefer[idx[b]], gender[idx[b]], 1, 0)
    np.testing.assert_allclose(batched[b], gaps, rtol=1e-6)
    assert batched_mean[b] == pytest.approx(mean_abs)

  def stat(p, g):
    return bias.association_bias(p, g, 1, 0)[1]

  point, lo, hi = bootstrap_ci(stat, prefer, gender, seed=0, num_samples=300)
  assert point == pytest.approx(0.25) and lo < 0.25 < hi


def test_attribute_accuracy_planted_and_ties_are_wrong():
  rng = np.random.default_rng(4)
  labels = np.repeat([0, 1], 50)
  correct = np.arange(100) % 10 != 0  # 90 % correct
  img = np.stack([
      _image(rng, {int(lab if ok else 1 - lab): 1.0, int(1 - lab if ok else lab): 0.2})
      for lab, ok in zip(labels, correct)])
  groups = np.stack([_basis(0), _basis(1)])
  hits = bias.attribute_correct(img, groups, labels)
  assert hits.mean() == pytest.approx(0.9)
  tied = bias.attribute_correct(np.full((2, D), 0.5), groups, np.array([0, 1]))
  np.testing.assert_array_equal(tied, [0, 0])


# ------------------------------------------------------------- data level ---

GROUPS = ("man", "woman")
LABELS = ("nurse", "doctor", "librarian", "scientist")
PAIRS = [("nurse", "doctor"), ("librarian", "scientist")]


def _annotations():
  # (gender or None if unknown, label or None)
  rows = [("man", "doctor"), ("man", "doctor"), ("man", "nurse"),
          ("woman", "nurse"), ("woman", "nurse"), ("woman", "doctor"),
          ("man", "librarian"), ("woman", "scientist"), (None, "nurse"),
          ("man", None)]
  s = np.array([[g == x for x in GROUPS] for g, _ in rows], np.float32)
  y = np.array([[l == x for x in LABELS] for _, l in rows], np.float32)
  known = np.array([g is not None for g, _ in rows], np.float32)
  return {"s": s, "known": known, "y": y, "w": np.zeros((10, 0), np.float32),
          "u": np.zeros(10, np.float32)}


def test_data_bias_matches_hand_counts_before_and_after():
  q = np.array([0.5, 0.5, 1, 1, 1, 1, 1, 1, 1, 0])
  out = data_bias.data_bias_before_after(
      _annotations(), q, group_names=GROUPS, label_names=LABELS, pairs=PAIRS)
  expected = {
      # Before: 5 men, 4 women known; nurse share 1/3 (men) vs 2/3 (women). RB is the men's
      # share of the two groups minus 1/2, as the model's RB: 100 (5/9 - 1/2).
      "data/before/prevalence/man": 5 / 9, "data/before/prevalence/woman": 4 / 9,
      "data/before/rb": 100 * (5 / 9 - 1 / 2),
      "data/before/ab/nurse_doctor": 100 * (2 / 3 - 1 / 3),
      "data/before/ab/librarian_scientist": -100.0,
      "data/before/ab_mean": (100 / 3 + 100) / 2,
      # After: halved male doctors, dropped the unlabelled man.
      "data/after/prevalence/man": 3 / 7, "data/after/prevalence/woman": 4 / 7,
      "data/after/rb": 100 * (3 / 7 - 1 / 2),
      "data/after/ab/nurse_doctor": 100 * (2 / 3 - 1 / 2),
      "data/after/ab/librarian_scientist": -100.0,
      "data/after/ab_mean": (100 / 6 + 100) / 2,
  }
  assert out.keys() == expected.keys()
  for key, value in expected.items():
    assert out[key] == pytest.approx(value), key


def test_data_bias_empty_pair_is_nan_and_bad_input_is_explained():
  ann = _annotations()
  ann["y"][:, 2:] = 0  # nobody is a librarian or scientist any more
  out = data_bias.data_bias_metrics(ann, group_names=GROUPS, label_names=LABELS,
                                    pairs=PAIRS)
  assert np.isnan(out["data/ab/librarian_scientist"])
  assert np.isnan(out["data/ab_mean"])
  assert out["data/ab/nurse_doctor"] == pytest.approx(100 / 3)  # points
  with pytest.raises(ValueError, match="Unknown label 'pilot'"):
    data_bias.data_bias_metrics(ann, group_names=GROUPS, label_names=LABELS,
                                pairs=[("pilot", "nurse")])
  with pytest.raises(ValueError, match="q must be"):
    data_bias.data_bias_metrics(ann, group_names=GROUPS, label_names=LABELS,
                                pairs=PAIRS, q=np.ones(3))
  with pytest.raises(ValueError, match="no 'known'"):
    data_bias.data_bias_metrics({"s": ann["s"], "y": ann["y"]}, group_names=GROUPS,
                                label_names=LABELS, pairs=PAIRS)


@pytest.mark.parametrize("seed", range(8))
def test_data_bias_points_match_loops_on_random_weighted_annotations(seed):
  # Multi-hot groups (an example may be in both or neither), unknown attributes and fractional
  # keep weights; loops over examples in float64.
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 80))
  ann = {"s": (rng.random((n, 2)) < 0.5).astype(np.float32),
         "known": (rng.random(n) < 0.8).astype(np.float32),
         "y": (rng.random((n, 4)) < 0.4).astype(np.float32)}
  q = rng.uniform(0, 1, n) * (rng.random(n) < 0.9)
  out = data_bias.data_bias_metrics(ann, group_names=GROUPS, label_names=LABELS, pairs=PAIRS,
                                    q=q)
  mass = [sum(q[i] * ann["known"][i] * ann["s"][i, g] for i in range(n)) for g in range(2)]
  rb = 100 * (mass[0] / (mass[0] + mass[1]) - 0.5) if sum(mass) > 0 else np.nan
  np.testing.assert_allclose(out["data/rb"], rb, rtol=1e-9, atol=1e-9)
  gaps = []
  for f, s in ((0, 1), (2, 3)):
    rate = []
    for g in (1, 0):  # woman minus man
      w = [q[i] * ann["known"][i] * ann["s"][i, g] * max(ann["y"][i, f], ann["y"][i, s])
           for i in range(n)]
      rate.append(sum(wi * ann["y"][i, f] for i, wi in enumerate(w)) / sum(w)
                  if sum(w) > 0 else np.nan)
    gaps.append(100 * (rate[0] - rate[1]))
    np.testing.assert_allclose(out[f"data/ab/{LABELS[f]}_{LABELS[s]}"], gaps[-1], rtol=1e-9,
                               atol=1e-9)
  np.testing.assert_allclose(out["data/ab_mean"], np.mean(np.abs(gaps)), rtol=1e-9, atol=1e-9)
  assert -50 <= out["data/rb"] <= 50 or np.isnan(out["data/rb"])
