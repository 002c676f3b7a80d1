"""MaxSkew@k, NDKL@k, group accuracies and the template bootstrap against plain-Python
brute force and closed forms."""
import math

import numpy as np
import pytest

from siglip_fair.evaluate import fairness


def _brute_topk(row, groups, k):
  """Groups of the top k labelled images, ranked by (-score, index)."""
  items = sorted((-float(row[j]), j) for j in range(len(groups)) if groups[j] >= 0)
  return [int(groups[j]) for _, j in items[:k]]


def _brute_target(groups, num_groups, target):
  if target is not None:
    return [float(t) for t in target]
  labelled = [g for g in groups if g >= 0]
  return [labelled.count(g) / len(labelled) for g in range(num_groups)]


def _brute_maxskew(scores, groups, k, num_groups, target=None):
  pi = _brute_target(groups, num_groups, target)
  out = []
  for row in scores:
    top = _brute_topk(row, groups, k)
    best = -math.inf
    for g in range(num_groups):
      if pi[g] > 0:
        p = top.count(g) / len(top)
        best = max(best, math.log(p / pi[g]) if p > 0 else -math.inf)
    out.append(best)
  return out


def _brute_ndkl(scores, groups, k, num_groups, target=None):
  pi = _brute_target(groups, num_groups, target)
  out = []
  for row in scores:
    top = _brute_topk(row, groups, k)
    total = z = 0.0
    for i in range(1, len(top) + 1):
      kl = 0.0
      for g in range(num_groups):
        p = top[:i].count(g) / i
        if p > 0:
          kl += p * math.log(p / pi[g])
      total += kl / math.log2(i + 1)
      z += 1 / math.log2(i + 1)
    out.append(total / z)
  return out


CASES = [  # (Q, N, G, k)
    (5, 12, 2, 1), (7, 30, 3, 5), (4, 20, 4, 20), (6, 15, 3, 40), (3, 50, 5, 7),
    (9, 8, 2, 3), (1, 1, 1, 1)]


@pytest.mark.parametrize("q,n,g,k", CASES)
@pytest.mark.parametrize("tied", [False, True])
def test_maxskew_ndkl_match_brute_force(q, n, g, k, tied):
  rng = np.random.default_rng(q * 1000 + n * 10 + k + tied)
  groups = rng.integers(-1, g, n)
  groups[0] = 0  # at least one labelled image
  # Planted: group 0 scores higher for half the queries; coarse rounding plants ties.
  scores = rng.normal(size=(q, n)) + (groups == 0) * rng.integers(0, 2, (q, 1)) * 1.5
  if tied:
    scores = np.round(scores)
  for chunk in (2, 256):
    np.testing.assert_allclose(
        fairness.maxskew_at_k(scores, groups, k, num_groups=g, chunk_size=chunk),
        _brute_maxskew(scores, groups, k, g), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        fairness.ndkl_at_k(scores, groups, k, num_groups=g, chunk_size=chunk),
        _brute_ndkl(scores, groups, k, g), rtol=1e-10, atol=1e-12)
  target = rng.dirichlet(np.ones(g))
  np.testing.assert_allclose(fairness.maxskew_at_k(scores, groups, k, target=target),
                             _brute_maxskew(scores, groups, k, g, target), rtol=1e-12)
  np.testing.assert_allclose(fairness.ndkl_at_k(scores, groups, k, target=target),
                             _brute_ndkl(scores, groups, k, g, target), rtol=1e-10)


def test_ties_go_to_lower_index_and_unknown_excluded():
  scores = np.array([[1.0, 1.0, 1.0, 1.0, 5.0]])
  groups = np.array([1, 0, 0, 1, -1])  # image 4 is best but unknown
  # Top 1 = image 0 (group 1); top 2 = images 0, 1.
  pi = 0.5
  assert fairness.maxskew_at_k(scores, groups, 1)[0] == pytest.approx(math.log(1 / pi))
  assert fairness.maxskew_at_k(scores, groups, 2)[0] == pytest.approx(0.0)
  # Reordering ties by index changes the ranking deterministically.
  assert fairness.maxskew_at_k(scores, groups[[1, 0, 2, 3, 4]], 1)[0] == pytest.approx(
      math.log(2))


def test_absent_group_and_k_larger_than_set():
  groups = np.array([0, 0, 1, 1, 2, 2, -1])
  scores = np.array([[6.0, 5, 4, 3, 2, 1, 9]])
  # Top 2 = group 0 only; groups 1, 2 absent (skew -inf, not the max).
  assert fairness.maxskew_at_k(scores, groups, 2)[0] == pytest.approx(math.log(3))
  # k > 6 labelled images: all of them -> proportional, MaxSkew 0.
  assert fairness.maxskew_at_k(scores, groups, 100)[0] == 0.0
  np.testing.assert_allclose(fairness.ndkl_at_k(scores, groups, 100),
                             fairness.ndkl_at_k(scores, groups, 6))


def test_closed_forms():
  # Proportional top 4 (two of each group, target 1/2 each): MaxSkew 0.
  groups = np.array([0, 1, 0, 1, 0, 1])
  scores = -np.arange(6.0)[None]
  assert fairness.maxskew_at_k(scores, groups, 4)[0] == pytest.approx(0.0)
  # NDKL 0 needs every prefix proportional: one group only.
  assert fairness.ndkl_at_k(scores, np.zeros(6, int), 3)[0] == pytest.approx(0.0)
  # Top-k only group 0 with π_0 = 0.25: MaxSkew = log 4, NDKL = KL([1,0..]||π) = log 4.
  groups = np.array([0, 1, 2, 3] * 5)
  scores = np.where(groups == 0, 1.0, 0.0)[None] + np.linspace(0, 0.1, 20)
  for k in (1, 3, 5):
    assert fairness.maxskew_at_k(scores, groups, k)[0] == pytest.approx(math.log(4))
    assert fairness.ndkl_at_k(scores, groups, k)[0] == pytest.approx(-math.log(0.25))
  target = np.array([0.1, 0.2, 0.3, 0.4])
  assert fairness.ndkl_at_k(scores, groups, 5, target=target)[0] == pytest.approx(
      -math.log(0.1))


def _brute_group_acc(correct, groups, g):
  per = []
  for j in range(g):
    vals = [float(c) for c, x in zip(correct, groups) if x == j]
    per.append(sum(vals) / len(vals) if vals else math.nan)
  seen = [v for v in per if not math.isnan(v)]
  return per, min(seen), max(seen) - min(seen)


def test_group_accuracies_vs_loop_with_empty_group():
  rng = np.random.default_rng(3)
  groups = rng.choice([-1, 0, 1, 3], 200)  # group 2 empty, some unknown
  correct = rng.random(200) < np.array([0.9, 0.8, 0.7, 0.6])[np.maximum(groups, 0)]
  per, worst, gap = fairness.group_accuracies(correct, groups, 4)
  b_per, b_worst, b_gap = _brute_group_acc(correct, groups, 4)
  np.testing.assert_allclose(per, b_per)
  assert np.isnan(per[2])
  assert worst == pytest.approx(b_worst) and gap == pytest.approx(b_gap)
  assert worst > 0  # the empty group does not count as 0
  per, worst, gap = fairness.group_accuracies(correct.astype(float), groups, 4)
  assert worst == pytest.approx(b_worst)
  per, worst, gap = fairness.group_accuracies([1.0, 0.0], [-1, -1], 2)
  assert np.isnan(per).all() and np.isnan(worst) and np.isnan(gap)


def test_template_bootstrap():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(12, 3))
  stat = lambda v: v.mean(1)  # noqa: E731
  a = fairness.template_bootstrap(stat, values, num_samples=500, alpha=0.1, seed=7)
  b = fairness.template_bootstrap(stat, values, num_samples=500, alpha=0.1, seed=7)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  point, lo, hi = a
  np.testing.assert_allclose(point, values.mean(0))
  assert point.shape == lo.shape == (3,)
  assert np.all(lo <= point) and np.all(point <= hi) and np.all(lo < hi)
  same = np.tile(values[:1], (8, 1))
  point, lo, hi = fairness.template_bootstrap(stat, same, num_samples=200, alpha=0.05,
                                              seed=1)
  np.testing.assert_allclose(lo, point, rtol=1e-12)
  np.testing.assert_allclose(hi, point, rtol=1e-12)


@pytest.mark.parametrize("fn", [fairness.maxskew_at_k, fairness.ndkl_at_k])
def test_bad_inputs_raise(fn):
  scores = np.zeros((2, 4))
  groups = np.array([0, 1, 1, -1])
  with pytest.raises(ValueError, match="k=0"):
    fn(scores, groups, 0)
  with pytest.raises(ValueError, match="groups must be int"):
    fn(scores, groups[:3], 1)
  with pytest.raises(ValueError, match="scores must be"):
    fn(scores[0], groups, 1)
  with pytest.raises(ValueError, match="groups must lie"):
    fn(scores, np.array([0, 1, 2, -1]), 1, num_groups=2)
  with pytest.raises(ValueError, match="groups must lie"):
    fn(scores, np.array([0, 1, -2, 1]), 1)
  with pytest.raises(ValueError, match="sum to 1"):
    fn(scores, groups, 1, target=[0.5, 0.6])
  with pytest.raises(ValueError, match="non-negative"):
    fn(scores, groups, 1, target=[1.5, -0.5])
  with pytest.raises(ValueError, match="No labelled"):
    fn(scores, -np.ones(4, int), 1)
  with pytest.raises(ValueError, match="NaN"):
    fn(np.full((2, 4), np.nan), groups, 1)


def test_group_accuracies_bad_inputs():
  with pytest.raises(ValueError, match="must match"):
    fairness.group_accuracies([1, 0, 1], [0, 1], 2)
  with pytest.raises(ValueError, match="groups must lie"):
    fairness.group_accuracies([1, 0], [0, 2], 2)
  with pytest.raises(ValueError, match="num_groups"):
    fairness.group_accuracies([1, 0], [0, 0], 0)


def _dvl_top(row, groups, k):
  """Groups of the top k labelled images by score (the instances below have no ties)."""
  ranked = sorted(((float(s), int(g)) for s, g in zip(row, groups) if g >= 0), reverse=True)
  return [g for _, g in ranked[:k]]


def _dvl_maxskew(row, groups, k, dist):
  """debias-vision-lang's MaxSkew (Berg et al. 2022), transcribed from its formula: over the
  groups present among the labelled images, p = share of the top k, an absent group's p set
  to 1/k, skew = log p − log dist_g; the max starts at 0."""
  top = _dvl_top(row, groups, k)
  best = 0.0
  for g in sorted({int(x) for x in groups if x >= 0}):
    p = top.count(g) / k or 1 / k
    best = max(best, math.log(p) - math.log(dist[g]))
  return best


def _dvl_ndkl(row, groups, k, dist):
  """debias-vision-lang's NDKL: Σ_i KL(counts_i / i || dist) / log2(i + 1) over the top k,
  KL summed over p ≠ 0, normalised by Σ_{i ≤ k} 1 / log2(i + 1)."""
  counts, total = [0] * len(dist), 0.0
  for i, g in enumerate(_dvl_top(row, groups, k), 1):
    counts[g] += 1
    total += sum(c / i * (math.log(c / i) - math.log(d))
                 for c, d in zip(counts, dist) if c) / math.log2(i + 1)
  return total / sum(1 / math.log2(i + 1) for i in range(1, k + 1))


@pytest.mark.parametrize("seed", range(12))
def test_debias_vision_lang_convention_matches_its_formula(seed):
  rng = np.random.default_rng(seed)
  g = int(rng.integers(2, 5))
  n = int(rng.integers(10, 60))
  # Skewed shares make rare groups that the top k often misses (where smoothing matters).
  groups = rng.choice(np.arange(-1, g), n, p=rng.dirichlet(np.full(g + 1, 0.7)))
  groups[:g] = np.arange(g)  # every group present (their eq_opp target is over those)
  scores = rng.normal(size=(int(rng.integers(1, 6)), n)) + 2.0 * (groups == 0)
  labelled = groups[groups >= 0]
  shares = np.bincount(labelled, minlength=g) / len(labelled)
  for k in sorted({1, 2, int(rng.integers(1, len(labelled) + 1)), len(labelled)}):
    for target, dist in ((None, shares), (np.full(g, 1 / g), np.full(g, 1 / g))):
      got = fairness.maxskew_at_k(scores, groups, k, target=target,
                                  convention="debias_vision_lang")
      np.testing.assert_allclose(got, [_dvl_maxskew(r, groups, k, dist) for r in scores],
                                 rtol=1e-12, atol=1e-12)
      got = fairness.ndkl_at_k(scores, groups, k, target=target, convention="debias_vision_lang")
      np.testing.assert_allclose(got, [_dvl_ndkl(r, groups, k, dist) for r in scores],
                                 rtol=1e-10, atol=1e-12)


def test_debias_vision_lang_smooths_an_absent_rare_group():
  # Nine images of group 0 above one of group 1 (π_1 = 0.1): the top 2 misses group 1.
  groups = np.array([0] * 9 + [1])
  scores = -np.arange(10.0)[None]
  assert fairness.maxskew_at_k(scores, groups, 2)[0] == pytest.approx(math.log(1 / 0.9))
  smoothed = fairness.maxskew_at_k(scores, groups, 2, convention="debias_vision_lang")[0]
  assert smoothed == pytest.approx(math.log(0.5 / 0.1))  # p_1 = 1/k
  with pytest.raises(ValueError, match="convention='dvl'"):
    fairness.maxskew_at_k(scores, groups, 2, convention="dvl")


def _eo_skip(y_true, y_pred, s, positive):
  """Equalised odds with undefined rates left out (loops)."""
  spreads = []
  for want in (True, False):
    rates = []
    for a in sorted(set(s.tolist())):
      rows = [i for i in range(len(s)) if s[i] == a and (y_true[i] == positive) == want]
      if rows:
        rates.append(sum(y_pred[i] == positive for i in rows) / len(rows))
    if rates:
      spreads.append(max(rates) - min(rates))
  return max(spreads)


def test_equalized_odds_difference_matches_fairlearn():
  metrics = pytest.importorskip("fairlearn.metrics")
  lacking = 0
  for seed in range(60):
    rng = np.random.default_rng(seed)
    n, num_groups = int(rng.integers(2, 40)), int(rng.integers(1, 5))
    s = rng.choice([3, 7, 8, 11][:num_groups], n)  # arbitrary values, some maybe absent
    # Per-group base rates of 0 or 1 leave groups without positives or without negatives.
    base = rng.choice([0.0, 0.3, 0.7, 1.0], 12)[s]
    y_true = (rng.random(n) < base).astype(int)
    y_pred = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    for a in np.unique(s):
      lacking += len(set(y_true[s == a])) == 1
    want = metrics.equalized_odds_difference(y_true, y_pred, sensitive_features=s)
    got = fairness.equalized_odds_difference(y_true, y_pred, s)
    assert got == pytest.approx(want, abs=1e-12), seed
    # Multi-class labels binarised at `positive`, as fairlearn needs them.
    y3_true, y3_pred = y_true * 2 + rng.integers(0, 2, n), y_pred * 2 + rng.integers(0, 2, n)
    want = metrics.equalized_odds_difference(
        (y3_true == 2).astype(int), (y3_pred == 2).astype(int), sensitive_features=s)
    assert fairness.equalized_odds_difference(y3_true, y3_pred, s, positive=2) == (
        pytest.approx(want, abs=1e-12))
    assert fairness.equalized_odds_difference(y_true, y_pred, s, missing="skip") == (
        pytest.approx(_eo_skip(y_true, y_pred, s, 1), abs=1e-12))
  assert lacking >= 20  # the convention was exercised


def test_equalized_odds_conventions_differ_where_a_group_lacks_positives():
  # Group 1 has no positives: fairlearn counts its TPR as 0 (spread 0.5), "skip" ignores it.
  y_true, y_pred = np.array([1, 1, 0, 0, 0, 0]), np.array([1, 0, 1, 0, 1, 0])
  s = np.array([0, 0, 0, 0, 1, 1])
  assert fairness.equalized_odds_difference(y_true, y_pred, s) == pytest.approx(0.5)
  assert fairness.equalized_odds_difference(y_true, y_pred, s, missing="skip") == 0.0
  with pytest.raises(ValueError, match="missing='nan'"):
    fairness.equalized_odds_difference(y_true, y_pred, s, missing="nan")
  with pytest.raises(ValueError, match="equal non-empty"):
    fairness.equalized_odds_difference(y_true, y_pred[:3], s)
