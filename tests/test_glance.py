"""The demo's at-a-glance sentences say only what the intervals show."""
import numpy as np
import pytest

from siglip_fair.report import glance


def _row(rng, scale):
  row = {}
  for metric, _, unit in glance.COMPARED:
    value = rng.normal(0, scale if unit else 0.3)
    half = abs(rng.normal(0, scale / 4 if unit else 0.05))
    row.update({metric: value, metric + "_lo": value - half, metric + "_hi": value + half})
  return row


@pytest.mark.parametrize("seed", range(40))
def test_a_sentence_claims_a_change_only_when_the_intervals_are_disjoint(seed):
  rng = np.random.default_rng(seed)
  base, other = _row(rng, 20), _row(rng, 20)
  lines = glance.sentences(base, other)
  assert len(lines) == 1 + len(glance.COMPARED)
  rb_lo, rb_hi = base["bias/rb_lo"], base["bias/rb_hi"]
  assert ("shows a" in lines[0]) == (rb_lo > 0 or rb_hi < 0)
  for (metric, _, unit), line in zip(glance.COMPARED, lines[1:]):
    a = (base[metric + "_lo"], base[metric + "_hi"])
    b = (other[metric + "_lo"], other[metric + "_hi"])
    disjoint = a[1] < b[0] or b[1] < a[0]
    assert ("do not overlap" in line) == disjoint, line
    if disjoint and unit:  # bias is judged by its magnitude
      assert ("reduced" in line) == (abs(other[metric]) < abs(base[metric])), line
    if disjoint and not unit:
      assert ("raised" in line) == (other[metric] > base[metric]), line


def test_missing_metrics_and_intervals():
  base = {"bias/rb": 12.0, "bias/rb_lo": 9.0, "bias/rb_hi": 15.0, "zeroshot/top1": 0.5}
  other = {"bias/rb": 3.0, "bias/rb_lo": 1.0, "bias/rb_hi": 5.0, "zeroshot/top1": 0.6}
  lines = glance.sentences(base, other)
  assert lines[0].startswith("The baseline shows a") and "towards men" in lines[0]
  assert "reduced representation bias" in lines[1] and "25%" in lines[1]
  assert "no interval" in lines[2]
  assert len(lines) == 3  # AB and retrieval are in neither row
