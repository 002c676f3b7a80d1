"""Retrieval fairness (MaxSkew@k, NDKL@k; Geyik et al. 2019) and per-group accuracy.

Retrieval: Q text queries rank N images by similarity; each image carries a group in
[0, G) or -1 (unknown). Unknown images are dropped BEFORE ranking, so the top k are the
k best LABELLED images. Conventions:

* Ties: images are ordered by (score descending, image index ascending), so the top k
  is deterministic and a tie at the k-th place goes to the lower index.
* k larger than the number L of labelled images: the whole labelled set is used (k -> L).
* Target π: by default each group's share among the L labelled images (not uniform);
  an explicit `target` [G] must be non-negative and sum to 1.
* A group absent from the top k has skew log(0 / π_g) = -inf; it never sets the max,
  since the shares sum to 1 and some group is above its target or all equal it.
  Groups with π_g = 0 are left out of the max (MaxSkew is -inf only when every top-k
  image is from such groups); in NDKL they make KL = +inf once they appear.
* `convention="debias_vision_lang"` instead follows Berg et al. (2022)'s widely used code
  (github.com/oxai/debias-vision-lang, `measuring_bias.py`): in MaxSkew an absent group's
  share is smoothed to 1/k (as if one of its images were in the top k) and the max is
  floored at 0, so a rare group (π_g < 1/k) that the top k leaves out counts as skew
  log(1 / (k π_g)) > 0 instead of being ignored. Their NDKL has no smoothing: it equals ours.
  Kept differences: they keep every image tied at the k-th score (more than k rows, still
  divided by k) and divide by the requested k when fewer images exist; here the top k is
  exactly min(k, L) images, so both conventions agree with each other wherever neither
  of those edge cases occurs.

Equalised odds (`equalized_odds_difference`) follows fairlearn by default.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from siglip_fair.evaluate.bootstrap import bootstrap_ci

SKEW_CONVENTIONS = ("exact", "debias_vision_lang")
EO_MISSING = ("zero", "skip")


def _check_ranking(scores, groups, k, target, num_groups, chunk_size, convention="exact"):
  if convention not in SKEW_CONVENTIONS:
    raise ValueError(f"convention={convention!r}; use one of {SKEW_CONVENTIONS}.")
  scores = np.asarray(scores)
  groups = np.asarray(groups)
  if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.number):
    raise ValueError(f"scores must be float [Q, N], got {scores.dtype} {scores.shape}.")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN; a ranking needs comparable scores.")
  if groups.shape != (scores.shape[1],) or not np.issubdtype(groups.dtype, np.integer):
    raise ValueError(f"groups must be int [{scores.shape[1]}] (one per image, as "
                     f"scores' columns), got {groups.dtype} {groups.shape}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k={k!r} must be an int >= 1.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  labelled = groups >= 0
  if not labelled.any():
    raise ValueError("No labelled image (every group is -1); nothing to rank.")
  if target is not None:
    target = np.asarray(target, np.float64)
    if target.ndim != 1 or not len(target):
      raise ValueError(f"target must be float [G], got shape {target.shape}.")
    if num_groups is not None and num_groups != len(target):
      raise ValueError(f"num_groups={num_groups} but target has {len(target)} entries.")
    if (target < 0).any() or not np.isclose(target.sum(), 1.0, atol=1e-6):
      raise ValueError(f"target must be non-negative and sum to 1, got {target} "
                       f"(sum {target.sum()}).")
    num_groups = len(target)
  num_groups = int(groups.max()) + 1 if num_groups is None else int(num_groups)
  if groups.min() < -1 or groups.max() >= num_groups:
    raise ValueError(f"groups must lie in [0, {num_groups}) or be -1 (unknown); got "
                     f"values in [{groups.min()}, {groups.max()}].")
  if target is None:
    target = np.bincount(groups[labelled], minlength=num_groups) / labelled.sum()
  return scores, groups, labelled, min(int(k), int(labelled.sum())), target


def _topk_counts(scores, groups, labelled, k, num_groups, chunk_size):
  """Per query chunk, one-hot groups of the top k labelled images in rank order.

  Yields float [C, k, G]; ranked by (score desc, index asc). Works on a [C, L] slice:
  argpartition finds the k-th best score, ties at it are taken lowest index first, and
  only the k chosen images are sorted.
  """
  cols = np.flatnonzero(labelled)
  g = groups[cols]
  for start in range(0, scores.shape[0], chunk_size):
    s = scores[start:start + chunk_size, cols].astype(np.float64)
    c = s.shape[0]
    kth = np.take_along_axis(s, np.argpartition(-s, k - 1, axis=1)[:, k - 1:k], axis=1)
    above = s > kth
    tied = s == kth
    need = k - above.sum(1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= need))
    idx = np.nonzero(chosen)[1].reshape(c, k)  # ascending image index per row
    order = np.argsort(-np.take_along_axis(s, idx, axis=1), axis=1, kind="stable")
    ranked = g[np.take_along_axis(idx, order, axis=1)]  # [C, k]
    yield (ranked[..., None] == np.arange(num_groups)).astype(np.float64)


def maxskew_at_k(scores: np.ndarray, groups: np.ndarray, k: int, *,
                 target: np.ndarray | None = None, num_groups: int | None = None,
                 chunk_size: int = 256, convention: str = "exact") -> np.ndarray:
  """MaxSkew@k = max_{g: π_g > 0} log(p_g / π_g), p_g = share of group g in the top k.

  Args:
    scores: float [Q, N] similarities of Q queries to N images.
    groups: int [N] in [0, G), -1 = unknown (excluded from ranking).
    k: top-k size, >= 1 (no default); k > L labelled images uses all L.
    target: float [G] π (default: group shares among the labelled images).
    num_groups: G (default: len(target), else max(groups) + 1).
    chunk_size: queries ranked at once; memory is O(chunk_size * N).
    convention: "exact" (p_g = 0 gives skew -inf, so an absent group never sets the max) or
      "debias_vision_lang" (p_g = 0 is smoothed to 1/k and the result floored at 0; see the
      module docstring).

  Returns:
    float [Q]; 0 = top k proportional to π, log(1/π_g) = only group g.
  """
  scores, groups, labelled, k, target = _check_ranking(
      scores, groups, k, target, num_groups, chunk_size, convention)
  smooth = convention == "debias_vision_lang"
  out = []
  with np.errstate(divide="ignore"):
    log_target = np.log(target)
    for onehot in _topk_counts(scores, groups, labelled, k, len(target), chunk_size):
      counts = onehot.sum(1)  # [C, G]
      if smooth:
        counts = np.where(counts > 0, counts, 1.0)
      skew = np.log(counts / k) - log_target
      best = np.max(np.where(target > 0, skew, -np.inf), axis=1)
      out.append(np.maximum(best, 0.0) if smooth else best)
  return np.concatenate(out) if out else np.zeros((0,))


def ndkl_at_k(scores: np.ndarray, groups: np.ndarray, k: int, *,
              target: np.ndarray | None = None, num_groups: int | None = None,
              chunk_size: int = 256, convention: str = "exact") -> np.ndarray:
  """NDKL@k = (1/Z) Σ_{i=1..k} KL(p_{top-i} || π) / log2(i + 1), Z = Σ_{i=1..k} 1/log2(i+1).

  p_{top-i} is the group distribution of the top i images; KL(p||π) = Σ_g p_g log(p_g/π_g)
  with 0·log 0 = 0 (+inf if p_g > 0 = π_g). Args as `maxskew_at_k` (k > L: the sum runs
  to L). Both conventions give the same value: debias-vision-lang's NDKL drops 0·log 0
  terms exactly like this one; `convention` is accepted so both metrics share one switch.

  Returns:
    float [Q] >= 0; 0 iff every prefix of the top k is distributed as π.
  """
  scores, groups, labelled, k, target = _check_ranking(
      scores, groups, k, target, num_groups, chunk_size, convention)
  i = np.arange(1, k + 1, dtype=np.float64)
  weight = 1.0 / np.log2(i + 1)
  out = []
  with np.errstate(divide="ignore", invalid="ignore"):
    for onehot in _topk_counts(scores, groups, labelled, k, len(target), chunk_size):
      p = np.cumsum(onehot, axis=1) / i[:, None]  # [C, k, G]
      terms = np.where(p > 0, p * (np.log(p) - np.log(target)), 0.0)
      out.append(terms.sum(-1) @ weight / weight.sum())
  return np.concatenate(out) if out else np.zeros((0,))


def equalized_odds_difference(y_true, y_pred, sensitive, *, positive: int = 1,
                              missing: str = "zero") -> float:
  """Equalised-odds difference: max(spread of TPR, spread of FPR) over sensitive groups.

  A rate's spread is its largest minus smallest value over the groups present in
  `sensitive`; TPR_a = P(ŷ = positive | y = positive, a), FPR_a = P(ŷ = positive | y ≠
  positive, a). Labels are binarised at `positive` first.

  Args:
    y_true, y_pred: int [n] labels and predictions (any classes).
    sensitive: int [n] sensitive attribute value per example.
    positive: the class treated as positive.
    missing: a present group with no positives (no negatives) has no TPR (FPR).
      "zero": it counts as 0, as fairlearn's `equalized_odds_difference` does (its rates
        come from sklearn's confusion matrix, which turns 0/0 into 0), so such a group can
        make the difference as large as another group's rate;
      "skip": the group is left out of that rate's spread (the rate is undefined, not 0);
        when no group has the rate at all, the other rate's spread is returned.

  Returns:
    float in [0, 1]; 0 for a single group.
  """
  if missing not in EO_MISSING:
    raise ValueError(f"missing={missing!r}; use one of {EO_MISSING}.")
  y_true, y_pred, sensitive = (np.asarray(a) for a in (y_true, y_pred, sensitive))
  if not (y_true.shape == y_pred.shape == sensitive.shape) or y_true.ndim != 1 or not y_true.size:
    raise ValueError(f"y_true {y_true.shape}, y_pred {y_pred.shape} and sensitive "
                     f"{sensitive.shape} must be equal non-empty [n] arrays.")
  is_pos, selected = y_true == positive, y_pred == positive
  spreads = []
  for label in (is_pos, ~is_pos):  # TPR, then FPR
    rates = []
    for a in np.unique(sensitive):
      rows = (sensitive == a) & label
      if rows.any():
        rates.append(selected[rows].mean())
      elif missing == "zero":
        rates.append(0.0)
    spreads.append(max(rates) - min(rates) if rates else np.nan)
  return float(np.nanmax(spreads))  # every group has positives or negatives: one is defined


def group_accuracies(correct: np.ndarray, groups: np.ndarray,
                     num_groups: int) -> tuple[np.ndarray, float, float]:
  """Accuracy per group, the worst group and the best-minus-worst gap.

  Args:
    correct: bool or float [N] (1 = correct; fractions allowed).
    groups: int [N] in [0, G), -1 = unknown (excluded).
    num_groups: G >= 1.

  Returns:
    (per_group float [G], NaN for a group without images; worst = min over non-empty
    groups; gap = max - min over them). worst and gap are NaN if every group is empty.
  """
  correct = np.asarray(correct, np.float64)
  groups = np.asarray(groups)
  if num_groups < 1:
    raise ValueError(f"num_groups={num_groups} must be >= 1.")
  if correct.ndim != 1 or groups.shape != correct.shape or not np.issubdtype(
      groups.dtype, np.integer):
    raise ValueError(f"correct [N] and groups int [N] must match; got {correct.shape} "
                     f"and {groups.dtype} {groups.shape}.")
  if len(groups) and (groups.min() < -1 or groups.max() >= num_groups):
    raise ValueError(f"groups must lie in [0, {num_groups}) or be -1 (unknown); got "
                     f"values in [{groups.min()}, {groups.max()}].")
  keep = groups >= 0
  count = np.bincount(groups[keep], minlength=num_groups)
  total = np.bincount(groups[keep], weights=correct[keep], minlength=num_groups)
  per_group = np.divide(total, count, out=np.full(num_groups, np.nan), where=count > 0)
  if not (count > 0).any():
    return per_group, float("nan"), float("nan")
  seen = per_group[count > 0]
  return per_group, float(seen.min()), float(seen.max() - seen.min())


def template_bootstrap(stat_fn: Callable[[np.ndarray], np.ndarray],
                       per_template_values: np.ndarray, *, num_samples: int = 1000,
                       alpha: float = 0.05, seed: int | np.random.Generator = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Percentile bootstrap over prompt templates (axis 0, resampled with replacement).

  Args:
    stat_fn: maps [B, T, ...] (B resampled template sets) to [B] or [B, ...], e.g.
      `lambda v: v.mean(1)`.
    per_template_values: [T, ...] one value (or row) per template.
    num_samples, alpha, seed: as `bootstrap.bootstrap_ci`, which does the work.

  Returns:
    (point, lo, hi) of the statistic's shape; identical templates give lo = hi = point.
  """
  return bootstrap_ci(stat_fn, np.asarray(per_template_values), seed=seed,
                      num_samples=num_samples, alpha=alpha)
