"""Which examples a target-model batch holds, per method (SPEC §6.3), as small pure functions.

Every method is a distribution over training examples (or, for GroupDRO, a distribution over
groups that weights the loss):

* `erm`: uniform over examples.
* `cluster_uniform`: uniform over (pseudo) groups, uniform within a group (τ → ∞ below).
* `clip_debias`: every F steps, each group's mean training loss L_k gives
  p_k ∝ exp(L_k / τ); examples uniform within a group.
* `jtt`: examples a first ERM model got wrong are drawn `upweight` times as often.
* GroupDRO keeps uniform sampling and reweights the loss by q (see `dro_weights`).

Groups are int arrays [n] with values in [0, K); a group with no members never gets
probability mass.
"""
from __future__ import annotations

import numpy as np


def group_counts(groups: np.ndarray, num_groups: int) -> np.ndarray:
  """int64 [K] members per group; ValueError for ids outside [0, K)."""
  groups = np.asarray(groups)
  if groups.ndim != 1 or (groups.size and (groups.min() < 0 or groups.max() >= num_groups)):
    raise ValueError(f"groups must be a 1-d int array with values in [0, {num_groups}); got shape "
                     f"{groups.shape}" + (f", range [{groups.min()}, {groups.max()}]"
                                          if groups.size else "") + ".")
  return np.bincount(groups, minlength=num_groups).astype(np.int64)


def group_mean_losses(losses: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
  """float64 [K] mean of losses [n] per group; NaN for an empty group."""
  counts = group_counts(groups, num_groups)
  sums = np.bincount(groups, weights=np.asarray(losses, np.float64), minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def loss_aware_probabilities(group_losses: np.ndarray, tau: float) -> np.ndarray:
  """p_k ∝ exp(L_k / τ) over the groups whose loss is finite (the others get 0).

  Args:
    group_losses: float [K] mean loss per group, NaN for a group with no members.
    tau: temperature > 0; `inf` gives the uniform distribution over non-empty groups.

  Returns:
    float64 [K] summing to 1.
  """
  losses = np.asarray(group_losses, np.float64)
  present = np.isfinite(losses)
  if not present.any():
    raise ValueError("every group is empty; nothing to sample.")
  tau = float(tau)
  if not tau > 0:
    raise ValueError(f"tau={tau} must be > 0 (inf for cluster-uniform sampling).")
  logits = np.where(present, 0.0 if np.isinf(tau) else losses / tau, -np.inf)
  p = np.exp(logits - logits[present].max())
  return p / p.sum()


def example_probabilities(groups: np.ndarray, group_probs: np.ndarray) -> np.ndarray:
  """float64 [n]: p_{g_i} / n_{g_i}, i.e. draw a group by p, then one of its members uniformly."""
  group_probs = np.asarray(group_probs, np.float64)
  counts = group_counts(groups, len(group_probs))
  if np.any((counts == 0) & (group_probs > 0)):
    raise ValueError("a group with no members has probability > 0.")
  p = group_probs[groups] / counts[groups]
  return p / p.sum()


def jtt_probabilities(errors: np.ndarray, upweight: float) -> np.ndarray:
  """float64 [n] ∝ upweight for the first model's errors [n] bool, 1 for the rest."""
  if not upweight >= 1:
    raise ValueError(f"jtt upweight={upweight} must be >= 1.")
  w = np.where(np.asarray(errors, bool), float(upweight), 1.0)
  return w / w.sum()


class Sampler:
  """Draws batches of example indices from a distribution over the training set.

  Inverse-CDF sampling, so a batch costs O(B log n) however often the distribution is
  refreshed; a `numpy.random.Generator` makes every draw a function of the seed.
  """

  def __init__(self, probabilities: np.ndarray, seed: int | np.random.SeedSequence):
    self.rng = np.random.default_rng(seed)
    self.set_probabilities(probabilities)

  def set_probabilities(self, probabilities: np.ndarray) -> None:
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 1 or not p.size or np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
      raise ValueError("sampling probabilities must be a non-empty, finite, non-negative [n] "
                       "array with a positive sum.")
    self.probabilities = p / p.sum()
    self.cdf = np.cumsum(self.probabilities)
    self.cdf[-1] = 1.0

  def draw(self, batch_size: int) -> np.ndarray:
    """int64 [batch_size] indices, with replacement."""
    u = self.rng.random(batch_size)
    idx = np.searchsorted(self.cdf, u, side="right")
    # Zero-probability rows have a flat cdf step, which searchsorted(side='right') skips.
    return np.minimum(idx, len(self.cdf) - 1).astype(np.int64)


def dro_weights(q: np.ndarray, batch_groups: np.ndarray) -> np.ndarray:
  """GroupDRO loss weights for one batch (numpy reference of the jitted step).

  Args:
    q: float [K] group weights (a distribution).
    batch_groups: int [B] group of each example of the batch.

  Returns:
    float64 [B] with sum_i w_i * loss_i = sum over groups present of q_g * mean loss of g,
    renormalised over the groups present in the batch.
  """
  q = np.asarray(q, np.float64)
  counts = group_counts(batch_groups, len(q))
  present = counts > 0
  w = q[batch_groups] / counts[batch_groups]
  return w / q[present].sum()
