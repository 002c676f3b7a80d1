"""Data-level representation and association bias of annotations (SPEC §3).

The same quantities as the model-level metrics, measured on a dataset's
annotations (docs/ARCHITECTURE.md: `s` [N, m], `known` [N], `y` [N, c]) and
optionally weighted by keep probabilities or a keep mask `q` [N] (after M4):

* prevalence of group k among examples with a known attribute:
  P(k) = sum(q * known * s_k) / sum(q * known);
* data RB, mirroring the model's RB (share of object images preferring the first
  group's prompt, minus 1/2): P(first) / (P(first) + P(second)) - 1/2, the first
  group's share of the two groups' examples minus 1/2 (man vs woman by default). With
  two disjoint groups that cover every known example it is P(first) - 1/2 =
  (P(first) - P(second)) / 2;
* data AB of an occupation pair (first, second), mirroring the model's
  P(first | woman) - P(first | man): among known examples labelled with either
  occupation of the pair, the share labelled `first`, in one group minus the
  other. It is 0 when the pair's split does not depend on the group.

RB and AB are in points (`bias.POINTS` × the fraction: RB in [-50, 50], AB in
[-100, 100]), the unit of the model-level `bias/rb`, `bias/ab*`; prevalences are
fractions. A quantity whose denominator is empty (no known examples of a group in
a pair) is NaN.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from siglip_fair.evaluate.bias import POINTS


def _array(annotations: Mapping[str, np.ndarray], key: str, ndim: int,
           n: int | None) -> np.ndarray:
  if key not in annotations:
    raise ValueError(f"annotations have no {key!r}; expected keys s [N, m], "
                     f"known [N], y [N, c], got {sorted(annotations)}.")
  x = np.asarray(annotations[key], np.float64)
  if x.ndim != ndim or (n is not None and x.shape[0] != n):
    raise ValueError(f"annotations[{key!r}] has shape {x.shape}; expected "
                     f"{ndim} axes with {n if n is not None else 'N'} rows.")
  return x


def _index(names: Sequence[str], name: str, what: str) -> int:
  if name not in names:
    raise ValueError(f"Unknown {what} {name!r}; known: {list(names)}.")
  return list(names).index(name)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, np.float64)
  return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def prevalence(s: np.ndarray, known: np.ndarray, q: np.ndarray) -> np.ndarray:
  """[m] weighted share of each group among known examples (s [N, m], known, q [N])."""
  mass = q * known
  return _ratio(mass @ s, np.full(s.shape[1], mass.sum()))


def pair_rates(s: np.ndarray, known: np.ndarray, y: np.ndarray, q: np.ndarray,
               pairs: Sequence[tuple[int, int]]) -> np.ndarray:
  """P(first | group, pair) as [P, m]: per pair and group, the weighted share of
  known examples labelled with the pair's first occupation among those
  labelled with either.
  """
  rates = []
  for first, second in pairs:
    in_pair = np.maximum(y[:, first], y[:, second])
    mass = (q * known * in_pair)[:, None] * s  # [N, m]
    rates.append(_ratio(y[:, first] @ mass, mass.sum(0)))
  return np.stack(rates) if rates else np.zeros((0, s.shape[1]))


def data_bias_metrics(
    annotations: Mapping[str, np.ndarray],
    *,
    group_names: Sequence[str],
    label_names: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    q: np.ndarray | None = None,
    rb_groups: tuple[str, str] = ("man", "woman"),
    ab_groups: tuple[str, str] = ("woman", "man"),
    prefix: str = "data",
) -> dict[str, float]:
  """Data-level prevalences, RB and AB as a flat {name: value} dict.

  Args:
    annotations: dict with s [N, m], known [N], y [N, c] (numpy).
    group_names: m names, the columns of `s` (e.g. ("man", "woman")).
    label_names: c names, the columns of `y` (the occupations).
    pairs: (first, second) label names, e.g. [("nurse", "doctor")].
    q: optional keep probabilities / mask / weights [N] >= 0; None weighs every
      example 1 (the data before balancing).
    rb_groups: RB = P(a) / (P(a) + P(b)) - 1/2 for (a, b) = rb_groups.
    ab_groups: AB = P(first | ab_groups[0]) - P(first | ab_groups[1]).
    prefix: name prefix.

  Returns:
    {prefix/prevalence/<group> (fraction), prefix/rb, prefix/ab/<first>_<second>,
     prefix/ab_mean (mean |AB| over pairs)}; RB and AB in points.
  """
  s = _array(annotations, "s", 2, None)
  n = s.shape[0]
  known = _array(annotations, "known", 1, n)
  y = _array(annotations, "y", 2, n)
  if s.shape[1] != len(group_names) or y.shape[1] != len(label_names):
    raise ValueError(f"s has {s.shape[1]} columns and y {y.shape[1]}, but "
                     f"group_names has {len(group_names)} and label_names "
                     f"{len(label_names)}; pass one name per column.")
  q = np.ones(n) if q is None else np.asarray(q, np.float64)
  if q.shape != (n,) or not np.all(np.isfinite(q)) or np.any(q < 0):
    raise ValueError(f"q must be finite, >= 0 and of shape ({n},); got "
                     f"shape {q.shape}.")
  pair_ids = [(_index(label_names, a, "label"), _index(label_names, b, "label"))
              for a, b in pairs]
  ra, rb = (_index(group_names, g, "group") for g in rb_groups)
  aa, ab = (_index(group_names, g, "group") for g in ab_groups)

  prev = prevalence(s, known, q)
  out = {f"{prefix}/prevalence/{g}": float(p) for g, p in zip(group_names, prev)}
  share = _ratio(prev[ra], np.asarray(prev[ra] + prev[rb]))
  out[f"{prefix}/rb"] = float(POINTS * (share - 0.5))
  gaps = POINTS * np.array([r[aa] - r[ab] for r in pair_rates(s, known, y, q, pair_ids)])
  for (first, second), gap in zip(pairs, gaps):
    out[f"{prefix}/ab/{first}_{second}"] = float(gap)
  out[f"{prefix}/ab_mean"] = float(np.mean(np.abs(gaps))) if len(gaps) else float("nan")
  return out


def data_bias_before_after(annotations: Mapping[str, np.ndarray], q: np.ndarray,
                           *, prefix: str = "data", **kwargs) -> dict[str, float]:
  """`data_bias_metrics` unweighted (prefix/before/...) and weighted by q
  (prefix/after/...); kwargs as for `data_bias_metrics`."""
  return {**data_bias_metrics(annotations, prefix=f"{prefix}/before", **kwargs),
          **data_bias_metrics(annotations, q=q, prefix=f"{prefix}/after", **kwargs)}
