"""How much of a metric's spread is noise, and of which kind: a variance decomposition of runs
that differ only in their seed.

For a metric y (RB, AB, zero-shot top-1, ...) and seeds s = 1..S:
  - evaluation-sample variance: the bootstrap variance over evaluation images of each run's final
    value, ((hi - lo) / (2 z))² from its 95 % interval, averaged over seeds. The images are the
    same for every run, so this noise is shared by all seeds: it limits how well one number
    estimates the model's value on the population of images, not how runs differ.
  - training-step variance: half the mean squared difference of consecutive evaluations over the
    last half of each run (the step-to-step jitter around a slowly moving trend), averaged over
    seeds. Consecutive evaluations use the same images, so this is the model's own fluctuation.
  - seed variance: the variance of the final values over seeds (ddof 1) less the step variance
    that each final value carries; clipped at 0.
Signal-to-noise is |mean over seeds| / sqrt(component) per component and over their sum. The
curve criterion of the study is the largest |difference| of consecutive evaluations over the last
half of a run, relative to the final |value| (a curve, not noise, when well under 1/3).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054


def decompose(curves: Sequence[Sequence[float]], finals: Sequence[float],
              lows: Sequence[float] | None = None,
              highs: Sequence[float] | None = None) -> dict[str, float]:
  """Variance components of one metric over seeds.

  Args:
    curves: per seed, the metric's evaluations over the last half of the run, in step order
      ([T_s] each, T_s >= 2).
    finals: per seed, the final value [S].
    lows, highs: per seed, the final value's bootstrap 95 % interval (optional).

  Returns:
    dict(mean, seed_var, step_var, eval_var, total_sd, snr_seed, snr_step, snr_eval, snr_total,
    max_jump_rel): variances in the metric's units squared; SNRs inf where a component is 0;
    eval_var and snr_eval are nan without intervals.
  """
  finals = np.asarray(finals, np.float64)
  if finals.ndim != 1 or len(finals) != len(curves) or len(finals) < 2:
    raise ValueError(f"need >= 2 seeds with one curve and one final value each; got "
                     f"{len(curves)} curves and finals of shape {finals.shape}.")
  diffs = []
  for curve in curves:
    curve = np.asarray(curve, np.float64)
    if curve.ndim != 1 or len(curve) < 2:
      raise ValueError(f"each curve needs >= 2 evaluations; got shape {curve.shape}.")
    diffs.append(np.diff(curve))
  step_var = float(np.mean([0.5 * np.mean(d ** 2) for d in diffs]))
  seed_var = max(float(np.var(finals, ddof=1)) - step_var, 0.0)
  if lows is not None and highs is not None:
    half = (np.asarray(highs, np.float64) - np.asarray(lows, np.float64)) / (2 * Z95)
    eval_var = float(np.mean(half ** 2))
  else:
    eval_var = math.nan
  mean = float(finals.mean())
  total = seed_var + step_var + (0.0 if math.isnan(eval_var) else eval_var)

  def snr(var):
    if math.isnan(var):
      return math.nan
    return abs(mean) / math.sqrt(var) if var > 0 else math.inf

  jump = max(float(np.max(np.abs(d))) for d in diffs)
  return {"mean": mean, "seed_var": seed_var, "step_var": step_var, "eval_var": eval_var,
          "total_sd": math.sqrt(total), "snr_seed": snr(seed_var), "snr_step": snr(step_var),
          "snr_eval": snr(eval_var), "snr_total": snr(total),
          "max_jump_rel": jump / abs(mean) if mean else math.inf}


def from_runs(records: Sequence[Sequence[Mapping]], finals: Sequence[Mapping],
              metric: str) -> dict[str, float]:
  """`decompose` from runs' metrics.jsonl records and eval.json dicts (one per seed): the
  curve is every record holding `metric` in the last half of the run's steps."""
  curves = []
  for rows in records:
    rows = [r for r in rows if metric in r]
    if not rows:
      raise ValueError(f"no evaluation of {metric!r} in a run's metrics.jsonl.")
    last = max(r["step"] for r in rows)
    curves.append([r[metric] for r in rows if r["step"] >= last / 2])
  values = [f[metric] for f in finals]
  lows = [f.get(f"{metric}_lo") for f in finals]
  highs = [f.get(f"{metric}_hi") for f in finals]
  has_interval = all(v is not None for v in lows + highs)
  return decompose(curves, values, lows if has_interval else None,
                   highs if has_interval else None)
