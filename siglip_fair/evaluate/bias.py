"""Bias of a two-tower model, measured on embeddings (SPEC §3).

Preferences are pairwise comparisons of similarities; an exact tie counts as
half a preference for each side, so a model that cannot tell two prompts apart
sits exactly at parity (RB = 0, AB = 0) instead of favouring either.

Each preference has two readings: the paper's hard one (`prefers_first`: which prompt is
closer, so RB and AB are shares of images) and the model's probability of the first prompt at
its learnt temperature (`preference_probability`; RB `rb_smooth`, AB `ab/*`). Both feed the
same statistics.

The statistics (`representation_bias`, `association_bias`) accept arbitrary
leading batch axes, so `bootstrap.bootstrap_ci` evaluates all resamples at once.
They return fractions; what the evaluators and `data_bias` report is points, POINTS × the
fraction: RB in [−50, 50] (share − 1/2), AB in [−100, 100] (a difference of two shares).
"""
from __future__ import annotations

import numpy as np

from siglip_fair.evaluate import metrics

# The one unit of every reported RB / AB (model- and data-level, points, intervals, plots):
# percentage points, 100 × a share or probability.
POINTS = 100.0


def prefers_first(image_emb: np.ndarray, first_emb: np.ndarray,
                  second_emb: np.ndarray) -> np.ndarray:
  """Whether each image is closer to the first prompt embedding than the second.

  Args:
    image_emb: [N, D] normalised image embeddings.
    first_emb, second_emb: [D] (one comparison) or [P, D] (P comparisons, e.g.
      occupation pairs) normalised prompt embeddings.

  Returns:
    float32 [N] or [N, P]: 1 if sim(first) > sim(second), 0.5 on a tie, else 0.
  """
  image_emb = np.asarray(image_emb, np.float32)
  first_emb = np.asarray(first_emb, np.float32)
  second_emb = np.asarray(second_emb, np.float32)
  if first_emb.shape != second_emb.shape or first_emb.ndim not in (1, 2):
    raise ValueError(f"first_emb {first_emb.shape} and second_emb "
                     f"{second_emb.shape} must both be [D] or both [P, D].")
  if image_emb.ndim != 2 or image_emb.shape[1] != first_emb.shape[-1]:
    raise ValueError(f"image_emb must be [N, {first_emb.shape[-1]}], got "
                     f"{image_emb.shape}.")
  first, second = image_emb @ first_emb.T, image_emb @ second_emb.T
  return (first > second).astype(np.float32) + 0.5 * (first == second)


def preference_probability(image_emb: np.ndarray, first_emb: np.ndarray,
                           second_emb: np.ndarray, temperature: float) -> np.ndarray:
  """The model's probability of the first prompt when it chooses between two.

  A softmax over the two logits t·sim at the model's temperature t, i.e.
  sigmoid(t · (sim(first) − sim(second))). Unlike `prefers_first` it is smooth: on images
  that are near copies of one another (a synthetic world, a narrow face data set), a model
  with a tiny group direction in (first − second) flips every image of a group at once and
  the share of preferences jumps between 0 and 1, while the probability moves by as much as
  the model's preference actually changes.

  Args:
    image_emb: [N, D] normalised image embeddings.
    first_emb, second_emb: [D] or [P, D] normalised prompt embeddings.
    temperature: t > 0, the model's logit scale (1 / τ; SigLIP and CLIP learn it).

  Returns:
    float32 [N] or [N, P] in (0, 1); 0.5 on a tie.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 (the model's logit scale), got {temperature}.")
  prefer_shape = prefers_first(image_emb, first_emb, second_emb).shape  # validates shapes
  image_emb = np.asarray(image_emb, np.float64)
  gap = image_emb @ np.asarray(first_emb, np.float64).T - image_emb @ np.asarray(
      second_emb, np.float64).T
  # tanh form of the sigmoid: no overflow for large t·gap.
  prob = 0.5 * (1.0 + np.tanh(0.5 * float(temperature) * gap))
  return prob.astype(np.float32).reshape(prefer_shape)


def representation_bias(prefer: np.ndarray) -> np.ndarray:
  """RB = mean preference for the first group over object images, minus 0.5.

  With 1 / ½ / 0 preferences (`prefers_first`) this is the paper's RB, the share of images
  closer to the first group (SPEC §3). With the model's probabilities
  (`preference_probability`) it is the smooth RB: the share moves in steps of 1/N and by
  many steps at once when near-identical images cross the boundary together, while the mean
  probability changes as little as the model's preference does.

  Args:
    prefer: [..., N] in [0, 1] from `prefers_first` or `preference_probability` (object
      images, first group, second group), e.g. first = "man", second = "woman".

  Returns:
    [...] in [-0.5, 0.5], a fraction; 0 is parity (reported × POINTS). NaN when N = 0.
  """
  prefer = np.asarray(prefer, np.float32)
  if prefer.shape[-1] == 0:
    return np.full(prefer.shape[:-1], np.nan, np.float32)
  return prefer.mean(-1) - 0.5


def group_rates(prefer: np.ndarray, group: np.ndarray, g: int) -> np.ndarray:
  """P(prefers first | group == g): mean of `prefer` over rows of group g.

  Args:
    prefer: [..., N, P] preferences (`prefers_first` over P pairs).
    group: int [..., N] group index per row (e.g. the `gender` field).
    g: the group.

  Returns:
    [..., P]; NaN where group g has no rows.
  """
  prefer = np.asarray(prefer, np.float32)
  member = (np.asarray(group) == g).astype(np.float32)
  total = np.einsum("...n,...np->...p", member, prefer)
  count = np.broadcast_to(member.sum(-1)[..., None], total.shape)
  return np.divide(total, count, out=np.full_like(total, np.nan),
                   where=count > 0)


def association_bias(prefer: np.ndarray, group: np.ndarray, group_a: int,
                     group_b: int) -> tuple[np.ndarray, np.ndarray]:
  """AB per pair and its mean absolute value.

  Args:
    prefer: [..., N, P] in [0, 1]: the image's preference for the pair's first occupation,
      1/0.5/0 (`prefers_first`) or a probability (`preference_probability`).
    group: int [..., N] perceived group of each image.
    group_a, group_b: the contrasted groups (the project uses a = woman,
      b = man, so AB > 0 means women are matched more to the first,
      stereotypically female, occupation).

  Returns:
    (gaps [..., P] = P(first | a) - P(first | b), mean_abs [...] = mean of
    |gaps|), fractions in [-1, 1] (reported × POINTS); NaN when either group has no images.
  """
  gaps = group_rates(prefer, group, group_a) - group_rates(prefer, group, group_b)
  return gaps, np.abs(gaps).mean(-1)


def attribute_correct(image_emb: np.ndarray, group_emb: np.ndarray,
                      labels: np.ndarray) -> np.ndarray:
  """Zero-shot recognition of the sensitive attribute, per image.

  Args:
    image_emb: [N, D] normalised image embeddings.
    group_emb: [G, D] normalised group prompt-set embeddings.
    labels: int [N] true group in [0, G).

  Returns:
    float32 [N]: 1 if the true group scores strictly highest (a tie with
    another group is wrong, as in `metrics.zeroshot_ranks`).
  """
  ranks = metrics.zeroshot_ranks(image_emb, group_emb, labels)
  return (ranks == 0).astype(np.float32)
