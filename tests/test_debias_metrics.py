"""Debiasing fairness metrics against plain-Python loops over the definitions."""
import numpy as np
import pytest

from siglip_fair.debias import metrics


def _loop(y, p, a, num_a, positive=1):
  groups = {}
  for yi, pi, ai in zip(y, p, a):
    groups.setdefault((yi, ai), []).append(yi == pi)
  accs = [sum(v) / len(v) for v in groups.values()]

  def spread(cond):
    rates = []
    for g in range(num_a):
      members = [pi == positive for yi, pi, ai in zip(y, p, a) if ai == g and cond(yi)]
      if members:
        rates.append(sum(members) / len(members))
    return max(rates) - min(rates)

  return {"accuracy": np.mean(np.array(y) == np.array(p)), "worst_group_accuracy": min(accs),
          "accuracy_gap": max(accs) - min(accs),
          "demographic_parity_difference": spread(lambda yi: True),
          "equalized_odds_difference": max(spread(lambda yi: yi == positive),
                                           spread(lambda yi: yi != positive))}


@pytest.mark.parametrize("seed", range(5))
def test_fairness_metrics_match_loops(seed):
  rng = np.random.default_rng(seed)
  n, num_a = 300, int(rng.integers(2, 4))
  y = rng.integers(0, 2, n)
  a = rng.integers(0, num_a, n)
  p = np.where(rng.random(n) < 0.3 + 0.2 * a, 1 - y, y)  # more errors for larger a
  got = metrics.classification_fairness(y, p, a, num_sensitive=num_a)
  want = _loop(list(y), list(p), list(a), num_a)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


def test_closed_forms_and_errors():
  y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
  a = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  perfect = metrics.classification_fairness(y, y, a, num_sensitive=2)
  assert perfect["accuracy"] == perfect["worst_group_accuracy"] == 1.0
  assert perfect["demographic_parity_difference"] == perfect["equalized_odds_difference"] == 0
  always_one = metrics.classification_fairness(y, np.ones(8, int), a, num_sensitive=2)
  assert always_one["demographic_parity_difference"] == 0.0  # same rate in both groups
  assert always_one["worst_group_accuracy"] == 0.0 and always_one["accuracy"] == 0.5
  np.testing.assert_array_equal(metrics.pair_groups(y, a, 2), [2, 2, 0, 0, 3, 3, 1, 1])
  with pytest.raises(ValueError, match="sensitive values"):
    metrics.pair_groups(y, a + 5, 2)
  with pytest.raises(ValueError, match="equal non-empty"):
    metrics.classification_fairness(y, y[:3], a, num_sensitive=2)


def test_classification_equalized_odds_is_fairlearns():
  """The debias tables' equalised-odds difference is fairlearn's, including groups that lack
  positives or negatives (fairlearn counts their rate as 0)."""
  from fairlearn.metrics import equalized_odds_difference as fairlearn_eod
  lacking = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(4, 60)), int(rng.integers(2, 4))
    y_true, y_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    sensitive = rng.integers(0, k, n)
    if seed % 3 == 0:  # one group without positives
      y_true[sensitive == 0] = 0
    for a in np.unique(sensitive):
      lacking += len(np.unique(y_true[sensitive == a])) < 2
    ours = metrics.classification_fairness(y_true, y_pred, sensitive, num_sensitive=k)
    theirs = fairlearn_eod(y_true, y_pred, sensitive_features=sensitive)
    assert ours["equalized_odds_difference"] == pytest.approx(theirs, abs=1e-12), seed
  assert lacking >= 10  # the convention was exercised
