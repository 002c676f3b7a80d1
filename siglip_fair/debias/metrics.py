"""Fairness of a target classifier across groups (SPEC §6): overall and worst-group accuracy,
the accuracy gap, and the demographic-parity and equalised-odds differences (fairlearn's
definitions: largest minus smallest rate across sensitive groups).

Groups in the debiasing literature are (label, sensitive attribute) pairs: `pair_groups` makes
them. Empty groups are left out of worst / gap (see `evaluate.fairness.group_accuracies`).
"""
from __future__ import annotations

import numpy as np

from siglip_fair.evaluate import fairness
from siglip_fair.evaluate.fairness import group_accuracies


def pair_groups(labels, sensitive, num_sensitive: int) -> np.ndarray:
  """int [n]: label * num_sensitive + sensitive, one group per (label, attribute) pair."""
  labels, sensitive = np.asarray(labels, np.int64), np.asarray(sensitive, np.int64)
  if labels.shape != sensitive.shape or np.any(sensitive < 0) or np.any(
      sensitive >= num_sensitive):
    raise ValueError(f"labels {labels.shape} and sensitive {sensitive.shape} must match, with "
                     f"sensitive values in [0, {num_sensitive}).")
  return labels * num_sensitive + sensitive


def _rate_spread(hit, mask_by_group) -> float:
  rates = [hit[m].mean() for m in mask_by_group if m.any()]
  return float(max(rates) - min(rates)) if rates else float("nan")


def classification_fairness(y_true, y_pred, sensitive, *, num_sensitive: int,
                            positive: int = 1) -> dict[str, float]:
  """Accuracy and fairness of predictions y_pred [n] for labels y_true [n].

  Args:
    y_true, y_pred: int [n] class labels.
    sensitive: int [n] sensitive attribute in [0, num_sensitive).
    positive: the class whose selection rate / TPR / FPR the parity metrics compare.

  Returns:
    accuracy; worst_group_accuracy and accuracy_gap over (label, attribute) groups;
    demographic_parity_difference = spread over attribute values of P(ŷ = positive | a);
    equalized_odds_difference = max of the spreads of TPR and FPR (for `positive`), as
      fairlearn defines it: a group without positives (negatives) counts as TPR (FPR) 0
      (`evaluate.fairness.equalized_odds_difference`, missing='zero').
  """
  y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
  sensitive = np.asarray(sensitive, np.int64)
  if not (y_true.shape == y_pred.shape == sensitive.shape) or y_true.ndim != 1 or not y_true.size:
    raise ValueError(f"y_true {y_true.shape}, y_pred {y_pred.shape} and sensitive "
                     f"{sensitive.shape} must be equal non-empty [n] arrays.")
  correct = y_true == y_pred
  groups = pair_groups(y_true, sensitive, num_sensitive)
  num_groups = int(groups.max()) + 1
  _, worst, gap = group_accuracies(correct, groups, num_groups)
  by_attr = [sensitive == a for a in range(num_sensitive)]
  selected = y_pred == positive
  return {"accuracy": float(correct.mean()), "worst_group_accuracy": float(worst),
          "accuracy_gap": float(gap),
          "demographic_parity_difference": _rate_spread(selected, by_attr),
          "equalized_odds_difference": fairness.equalized_odds_difference(
              y_true, y_pred, sensitive, positive=positive)}
