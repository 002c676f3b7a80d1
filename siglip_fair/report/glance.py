"""The demo's answer at a glance: one sentence per comparison, worded by what the intervals show.

A sentence says "reduced" / "raised" only when the two models' 95 % intervals do not overlap,
"shows a representation bias" only when the baseline's RB interval excludes 0; otherwise it
says that the difference is not resolved. The seed-level tests of the sweep
(report/findings.py) are the study's verdicts; these are one seed's, over evaluation images.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from siglip_fair.report.summary import _number  # pylint: disable=protected-access

# (metric, what it is, unit): RB / AB in points, the quality metrics as fractions.
COMPARED = (("bias/rb", "representation bias (RB)", "points"),
            ("bias/ab_mean", "association bias (AB, mean over pairs)", "points"),
            ("zeroshot/top1", "zero-shot top-1", ""),
            ("retrieval/i2t_r1", "image-to-text R@1", ""))


def _interval(row: Mapping[str, Any], metric: str):
  """(value, lo, hi) of a metric, lo = hi = None without a finite interval; None if missing."""
  value, lo, hi = (_number(row.get(metric + b)) for b in ("", "_lo", "_hi"))
  if value is None:
    return None
  return (value, lo, hi) if lo is not None and hi is not None else (value, None, None)


def _fmt(iv, unit):
  value, lo, hi = iv
  f = "{:+.1f}" if unit else "{:.3f}"
  text = f.format(value)
  return text + (f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None else "")


def _disjoint(a, b) -> bool:
  return a[1] is not None and b[1] is not None and (a[2] < b[1] or b[2] < a[1])


def sentences(baseline: Mapping[str, Any], other: Mapping[str, Any],
              other_name: str = "balanced") -> list[str]:
  """One sentence per metric of COMPARED that both rows hold.

  Bias is compared in magnitude (|RB|, AB's mean is already of absolute gaps): balancing aims
  at 0, not at a sign.
  """
  out = []
  base_rb = _interval(baseline, "bias/rb")
  if base_rb and base_rb[1] is not None:
    excludes = base_rb[1] > 0 or base_rb[2] < 0
    side = "men" if base_rb[0] > 0 else "women"
    out.append(f"The baseline {'shows' if excludes else 'does not resolve'} a representation "
               f"bias: RB {_fmt(base_rb, 'points')}"
               + (f" excludes 0; object images lean towards {side}." if excludes else
                  " includes 0."))
  for metric, what, unit in COMPARED:
    a, b = _interval(baseline, metric), _interval(other, metric)
    if a is None or b is None:
      continue
    if unit:  # bias: compare magnitudes
      ma, mb = abs(a[0]), abs(b[0])
      verb = "reduced" if mb < ma else "raised"
      ratio = f" (to {mb / ma:.0%} of the baseline's)" if ma > 0 else ""
    else:
      verb = "raised" if b[0] > a[0] else "lowered"
      ratio = ""
    if _disjoint(a, b):
      out.append(f"{other_name.capitalize()} data {verb} {what}: {_fmt(a, unit)} -> "
                 f"{_fmt(b, unit)}{ratio}; the intervals do not overlap.")
    elif a[1] is not None and b[1] is not None:
      out.append(f"{other_name.capitalize()} data did not change {what} beyond its noise: "
                 f"{_fmt(a, unit)} -> {_fmt(b, unit)}; the intervals overlap.")
    else:
      out.append(f"{what[0].upper() + what[1:]}: {_fmt(a, unit)} -> {_fmt(b, unit)} (no "
                 "interval to compare).")
  return out
