"""Verdicts on the paper's findings (SPEC §5) from a sweep's runs: results_findings.json and
the findings section of results.md.

Runs that share every factor but data, switch and seed form a context (one per model size,
width, examples seen, training-set size, loss); each finding is judged per context from four
of its cells, paired by seed:

  B    baseline data throughout            Bal  balanced from the start (switch 0%)
  P    balanced_proxies from the start     FT   balanced for the last 10 % (switch 90%)

A finding is a set of claims. A claim is a quantity q per run and either one cell (one-sample:
its values over seeds against 0) or a cell and a reference cell (paired: the per-seed
differences cell − reference over the seeds both hold), with the sign the finding expects:

  F1 models absorb RB and AB from the data
     RB of B, against 0; expected: the data's skew (`data_directions`: men over-represented
       and contrast (man, woman) gives RB > 0).
     signed AB of B (mean over pairs of `bias/ab/<pair>`), against 0; expected: the data's
       stereotype (> 0 for contrast (woman, man) with the female-stereotyped occupation first).
     Signed, because |RB| and `bias/ab_mean` (a mean of |gaps|) exceed 0 for any noisy model:
     a one-sample test of them against 0 would "reproduce" F1 from noise alone. Where the
     config does not tell the data's direction (an imported corpus, parity), either sign
     counts and F1 can only be reproduced or inconclusive.
  F2 balancing reduces RB and AB:  |RB| Bal − B < 0;  AB Bal − B < 0.
  F3 proxies help RB but can hurt AB:  |RB| P − Bal < 0;  AB P − Bal > 0.
  F4 fine-tuning on balanced data fixes RB quickly but AB slowly:  |RB| FT − B < 0 (the last
     10 % of training already lowers it);  AB FT − Bal > 0 (still above balancing from the
     start). Also reported, untested: the share of balancing's reduction that FT recovers,
     (mean B − mean FT) / (mean B − mean Bal), for |RB| and AB (1: as low as Bal; 0: B).
  F5 balancing helps classification and hurts retrieval:  zero-shot top-1 Bal − B > 0;
     retrieval R@1 (mean of image→text and text→image) Bal − B < 0.

RB is `bias/rb` (the paper's share reading, points), AB `bias/ab_mean` (points).

Per claim: the effect is the mean over seeds of the values (one-sample) or differences
(paired); its 95 % interval is the t-interval over seeds, mean ± t(0.975, n−1) · s / √n (not a
bootstrap: with 6 seeds a bootstrap has only 462 distinct resamples and under-covers); p is
the two-sided exact Wilcoxon signed-rank p (`signed_rank_p`: zero differences dropped as
scipy's default 'wilcox', tied |d| given average ranks, the null distribution enumerated over
every sign assignment, so it equals scipy's exact p without ties and stays exact with them).
Verdict, with α = 0.05:
  reproduced      p ≤ α, and the mean and the signed-rank statistic (W+ − W−) both have the
                  expected sign;
  not reproduced  p ≤ α, and both have the opposite sign: evidence against the claim;
  inconclusive    otherwise: p > α (including every n < 6, where p ≥ 2 / 2^n > α), or the
                  mean and W+ − W− disagree. A Wilcoxon test cannot show that an effect is
                  absent, so no effect is "inconclusive", not "not reproduced".
A finding is reproduced when all its claims are, not reproduced when any claim is, and
inconclusive otherwise; one whose cells the sweep lacks is left out.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
SEED_NOTE = ("with n seeds the smallest two-sided p is 2 / 2^n: 0.25 for 3, 0.031 for 6, so a "
             "claim needs at least 6 seeds to be decided")
CELLS = {"B": ("baseline", None), "Bal": ("balanced", "0%"), "P": ("balanced_proxies", "0%"),
         "FT": ("balanced", "90%")}
QUANTITIES = {
    "rb": ("RB", lambda r: r.get("bias/rb")),
    "rb_abs": ("|RB|", lambda r: None if r.get("bias/rb") is None else abs(r["bias/rb"])),
    "ab_signed": ("signed AB", lambda r: r.get("bias/ab_signed")),
    "ab": ("AB", lambda r: r.get("bias/ab_mean")),
    "top1": ("zero-shot top-1", lambda r: r.get("zeroshot/top1")),
    "r1": ("retrieval R@1", lambda r: (r["retrieval/i2t_r1"] + r["retrieval/t2i_r1"]) / 2
           if "retrieval/i2t_r1" in r and "retrieval/t2i_r1" in r else None),
}
FINDINGS = {"F1": "models absorb RB and AB from the data",
            "F2": "balancing reduces RB and AB",
            "F3": "proxies help RB but can hurt AB",
            "F4": "fine-tuning on balanced data fixes RB quickly but AB slowly",
            "F5": "balancing helps classification and hurts retrieval"}
# (finding, quantity, cell, reference cell or None for one-sample, expected sign; a string
# names the row field holding the data's direction).
CLAIMS = (("F1", "rb", "B", None, "rb_direction"),
          ("F1", "ab_signed", "B", None, "ab_direction"),
          ("F2", "rb_abs", "Bal", "B", -1), ("F2", "ab", "Bal", "B", -1),
          ("F3", "rb_abs", "P", "Bal", -1), ("F3", "ab", "P", "Bal", +1),
          ("F4", "rb_abs", "FT", "B", -1), ("F4", "ab", "FT", "Bal", +1),
          ("F5", "top1", "Bal", "B", +1), ("F5", "r1", "Bal", "B", -1))


def data_directions(config: dict) -> tuple[int, int]:
  """(RB, AB) signs a model that absorbs the training data's skews shows, from a run's
  config.json: RB's from the owners' prevalence of women (world.owner_woman_prevalence, which
  defaults to the people's woman_prevalence) and the RB evaluator's contrast, AB's from
  world.association and the AB evaluator's contrast; 0 where unknown.

  RB is read on object images, which meet group words only through their owners' captions, so
  the owners' skew is the one a model can absorb as RB."""
  world, evals = config.get("world") or {}, config.get("evals") or {}
  if config.get("train_data"):
    return 0, 0  # an imported corpus: the world's knobs do not describe it

  def sign_for(group, contrast):
    contrast = tuple(contrast)
    if len(contrast) != 2 or group not in contrast:
      return 0
    return 1 if contrast[0] == group else -1

  rb = ab = 0
  prevalence = world.get("owner_woman_prevalence", world.get("woman_prevalence"))
  association = world.get("association")
  if _number(prevalence) and prevalence != 0.5:
    rb = sign_for("man" if prevalence < 0.5 else "woman",
                  (evals.get("rb") or {}).get("contrast", ("man", "woman")))
  if _number(association) and association != 0:
    # P(woman | occupation) is higher for each pair's first (female-stereotyped) occupation.
    ab = int(np.sign(association)) * sign_for(
        "woman", (evals.get("ab") or {}).get("contrast", ("woman", "man")))
  return rb, ab


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def signed_rank_p(d: Sequence[float]) -> float:
  """Two-sided exact Wilcoxon signed-rank p of the differences `d` (see the module docstring):
  the null probability of |W+ − W−| at least the observed one."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(d, np.float64)
  if not np.all(np.isfinite(d)):
    return math.nan
  d = d[d != 0]
  if d.size == 0:
    return 1.0
  if d.size > 200:  # far beyond a sweep's seeds; the normal approximation is exact enough
    return float(stats.wilcoxon(d, method="asymptotic").pvalue)
  ranks2 = np.rint(2 * stats.rankdata(np.abs(d))).astype(np.int64)  # average ranks × 2
  total = int(ranks2.sum())
  # Null distribution of 2·W+ (each rank positive with probability 1/2), by convolution.
  prob = np.zeros(total + 1)
  prob[0] = 1.0
  for r in ranks2:
    shifted = np.zeros_like(prob)
    shifted[r:] = prob[:-r]
    prob = (prob + shifted) / 2
  observed = abs(2 * int(ranks2[d > 0].sum()) - total)
  extreme = np.abs(2 * np.arange(total + 1) - total) >= observed
  return float(min(1.0, prob[extreme].sum()))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """mean ± t((1 + level) / 2, n − 1) · s / √n; NaNs for fewer than two values."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return math.nan, math.nan
  half = stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  return float(v.mean() - half), float(v.mean() + half)


def verdict(values: Sequence[float], p: float, expected: int, alpha: float = ALPHA) -> str:
  """The claim's verdict from its per-seed values (or differences), p and expected sign
  (0: either sign is the finding's)."""
  d = np.asarray(values, np.float64)
  if d.size == 0 or not p <= alpha:  # NaN p included
    return "inconclusive"
  from scipy import stats  # pylint: disable=g-import-not-at-top
  nonzero = d[d != 0]
  ranks = stats.rankdata(np.abs(nonzero))
  w = np.sign(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum())
  if np.sign(d.mean()) != w or w == 0:
    return "inconclusive"
  return "reproduced" if expected in (0, w) else "not reproduced"


def _cell_rows(rows, name):
  data, switch = CELLS[name]
  return {r["seed"]: r for r in rows if r["data"] == data and (switch is None
                                                               or r["switch"] == switch)}


def _claim(rows, quantity, cell, reference, expected) -> dict | None:
  get = QUANTITIES[quantity][1]
  a = _cell_rows(rows, cell)
  b = _cell_rows(rows, reference) if reference else None
  if not a or (reference and not b):
    return None
  if isinstance(expected, str):
    signs = {r.get(expected, 0) for r in a.values()}
    expected = signs.pop() if len(signs) == 1 else 0
  seeds, values = [], []
  for seed in sorted(a):
    x = get(a[seed])
    y = 0.0 if b is None else (get(b[seed]) if seed in b else None)
    if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
      seeds.append(seed)
      values.append(x - y)
  if not values:
    return None
  p = signed_rank_p(values)
  return {"quantity": QUANTITIES[quantity][0], "cell": cell, "reference": reference,
          "expected": int(expected), "n": len(values), "seeds": seeds,
          "effect": float(np.mean(values)), "ci": list(t_interval(values)), "p": p,
          "verdict": verdict(values, p, expected)}


def _recovered(rows, quantity) -> float | None:
  """F4's descriptive share: (mean B − mean FT) / (mean B − mean Bal) over shared seeds."""
  get = QUANTITIES[quantity][1]
  cells = [_cell_rows(rows, n) for n in ("B", "FT", "Bal")]
  seeds = set.intersection(*(set(c) for c in cells))
  vals = [[get(c[s]) for s in sorted(seeds)] for c in cells]
  if not seeds or any(v is None for vs in vals for v in vs):
    return None
  base, ft, bal = (float(np.mean(v)) for v in vals)
  return None if base == bal else (base - ft) / (base - bal)


def evaluate(rows: Sequence[dict], context_factors: Sequence[str]) -> list[dict]:
  """Per context: its factors, each finding's claims and verdict, F4's recovered shares."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in context_factors), []).append(row)
  out = []
  for key in sorted(groups):
    members = groups[key]
    findings = []
    for fid, statement in FINDINGS.items():
      claims = [c for c in (_claim(members, q, cell, ref, e)
                            for f, q, cell, ref, e in CLAIMS if f == fid) if c]
      if not claims:
        continue
      verdicts = {c["verdict"] for c in claims}
      overall = ("not reproduced" if "not reproduced" in verdicts else
                 "reproduced" if verdicts == {"reproduced"} else "inconclusive")
      findings.append({"id": fid, "statement": statement, "verdict": overall,
                       "claims": claims})
    if findings:
      out.append({"context": dict(zip(context_factors, key)), "findings": findings,
                  "f4_recovered": {q: _recovered(members, q) for q in ("rb_abs", "ab")}})
  return out


def _fmt(v, digits=3):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}g}"


def _claim_text(c) -> str:
  ref = f"{c['cell']} − {c['reference']}" if c["reference"] else f"{c['cell']} vs 0"
  sign = {1: "> 0", -1: "< 0", 0: "≠ 0"}[c["expected"]]
  return f"{c['quantity']} {ref} {sign}"


def to_markdown(results: Sequence[dict]) -> str:
  """The findings section of results.md."""
  lines = ["## Findings (SPEC §5)", "",
           "Cells, paired by seed: B baseline, Bal balanced from the start, P balanced with "
           "proxies from the start, FT balanced for the last 10 % (switch 90%). Effect: mean "
           "over seeds of the cell's value (one-sample) or of cell − reference; 95 % "
           "t-interval over seeds; p: two-sided exact Wilcoxon signed-rank. Verdict: "
           f"reproduced (p ≤ {ALPHA} in the expected direction), not reproduced (p ≤ {ALPHA} "
           "against it), inconclusive (otherwise); a finding needs all its claims. "
           f"{SEED_NOTE[0].upper()}{SEED_NOTE[1:]}. Definitions: `siglip_fair/report/findings.py`."]
  varying = _varying(results)
  for res in results:
    if varying:
      lines += ["", "### " + ", ".join(f"{k}={res['context'][k]}" for k in varying)]
    lines += ["", "| finding | verdict | claim | n | effect | 95 % CI | p | claim verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for f in res["findings"]:
      for i, c in enumerate(f["claims"]):
        head = [f"{f['id']} {f['statement']}", f"**{f['verdict']}**"] if i == 0 else ["", ""]
        lo, hi = c["ci"]
        claim = _claim_text(c).replace("|", "\\|")  # |RB| inside a table cell
        lines.append("| " + " | ".join([*head, claim, str(c["n"]), _fmt(c["effect"]),
                                         f"[{_fmt(lo)}, {_fmt(hi)}]", f"{c['p']:.4g}",
                                         c["verdict"]]) + " |")
    rec = res["f4_recovered"]
    if any(v is not None for v in rec.values()):
      lines += ["", "F4, share of balancing's reduction recovered by switching at 90 % (1: as "
                f"low as Bal, 0: B): |RB| {_fmt(rec['rb_abs'], 2)}, AB {_fmt(rec['ab'], 2)}."]
  return "\n".join(lines) + "\n"


def summary_lines(results: Sequence[dict]) -> list[str]:
  """One line per context and finding, for the terminal."""
  out = []
  for res in results:
    where = ", ".join(f"{k}={res['context'][k]}" for k in _varying(results))
    for f in res["findings"]:
      claims = "; ".join(f"{_claim_text(c)}: {_fmt(c['effect'])} [{_fmt(c['ci'][0])}, "
                         f"{_fmt(c['ci'][1])}] p={c['p']:.4g}" for c in f["claims"])
      out.append(f"{f['id']} {f['verdict']}{f' [{where}]' if where else ''}: "
                 f"{f['statement']}; {claims}")
  return out


def _varying(results) -> list[str]:
  """The context factors that differ between contexts."""
  return [k for k in (results[0]["context"] if results else {})
          if len({r["context"][k] for r in results}) > 1]


def to_json(results: Sequence[dict]) -> dict:
  """results_findings.json: the definitions in brief and every context's verdicts."""
  def clean(v):  # JSON has no NaN
    if isinstance(v, float) and math.isnan(v):
      return None
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
      return [clean(x) for x in v]
    return v
  return {"alpha": ALPHA, "cells": {k: list(v) for k, v in CELLS.items()},
          "effect": "mean over seeds of cell (one-sample) or cell - reference (paired by seed)",
          "interval": "95% t-interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n)",
          "test": "two-sided exact Wilcoxon signed-rank (zeros dropped, ties average-ranked)",
          "note": SEED_NOTE, "contexts": clean(list(results))}
