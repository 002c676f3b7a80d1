"""The M4 data card: what balancing did to the data, and whether the targets were met.

Definitions (all "among known" quantities use examples whose attribute k is known):
  prevalence of group k     P(s_k | known), unweighted (before) or weighted by q (after);
  association (k, r)        P(s_k | y_r, known) − P(s_k | known), before / after, and the same
                            with proxy w_j in place of y_r; 0 means independence;
  moment                    the constrained quantity E[q·b] (mean over all N; q = 1 before);
  residual                  |moment| − ε: > 0 is a violation;
  price                     the dual of the constraint (λ = v⁺ − v⁻; |λ| = V means capped);
  Kish ESS                  (Σq)² / Σq², the sample size the weighted data are worth.
The verdict is 'infeasible' when some constraint's residual exceeds `config.tol` after
convergence (or E[q] misses η by more); those constraints are 'binding', listed worst first.
Their duals grow towards the cap V (`at_cap` once they reach it): no price up to V meets them.
Quantities with no support (e.g. a label no known example has) are None.
"""
from __future__ import annotations

import numpy as np


def _names(names: dict | None, m: int, c: int, p: int) -> dict:
  names = dict(names or {})
  out = {}
  for key, n, prefix in (("groups", m, "g"), ("labels", c, "y"), ("proxies", p, "w")):
    got = list(names.get(key) or [f"{prefix}{i}" for i in range(n)])
    if len(got) != n:
      raise ValueError(f"names[{key!r}] has {len(got)} entries but the data have {n}; give one "
                       "name per column or leave it out.")
    out[key] = [str(x) for x in got]
  return out


def _ratio(num, den):
  """num / den elementwise as floats, None where den is 0."""
  num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _py(x):
  """A float, or None for NaN (undefined), so the card stays valid JSON."""
  x = float(x)
  return None if np.isnan(x) else x


def card_sums(ann: dict, q, keep) -> dict:
  """The float64 sums a data card is made of, over in-memory annotations (numpy reference of
  the streamed `stream.card_pass`; sums of chunks add up).

  For each weight ('one', 'q', 'keep'): known [m], s_known [m] and, per column block x in
  (y, w), known_x / s_x [m, cols] = Σ weight·known_k·x_r (·s_k); plus q_sum, q_sq, keep_sum, n.
  """
  s = np.asarray(ann["s"], np.float64)
  n, m = s.shape
  known = np.asarray(ann["known"], np.float64)
  known = np.broadcast_to(known[:, None] if known.ndim == 1 else known, (n, m))
  cols = {b: np.asarray(ann.get(b, np.zeros((n, 0))), np.float64) for b in ("y", "w")}
  q, keep = np.asarray(q, np.float64), np.asarray(keep, np.float64)
  out = {}
  for name, wt in (("one", np.ones(n)), ("q", q), ("keep", keep)):
    k = known * wt[:, None]
    out[name] = dict(known=k.sum(0), s_known=(k * s).sum(0))
    for b, x in cols.items():
      out[name][f"known_{b}"] = k.T @ x
      out[name][f"s_{b}"] = (k * s).T @ x
  out.update(q_sum=q.sum(), q_sq=(q * q).sum(), keep_sum=keep.sum(), n=float(n))
  return out


def _moments(sums, pi) -> dict:
  """E[q·b] as a constraint tree from the sums: Σ q·(s_k − π_k)·known_k·x / N."""
  qs, n = sums["q"], sums["n"]
  pi = np.asarray(pi, np.float64)
  return dict(rep=(qs["s_known"] - pi * qs["known"]) / n,
              assoc=(qs["s_y"] - pi[:, None] * qs["known_y"]) / n,
              proxy=(qs["s_w"] - pi[:, None] * qs["known_w"]) / n)


def data_card(ann: dict, q, keep, *, pi, eps: dict, duals: dict, config, info: dict,
              names: dict | None = None) -> dict:
  """JSON-serialisable summary of an M4 run over in-memory annotations.

  ann: the annotations given to `balance`; q [N]; keep bool [N]; pi [m]; eps, duals: as in
  m4 (constraint trees); info: solver counters from `m4.solve`.
  """
  return data_card_from_sums(card_sums(ann, q, keep), pi=pi, eps=eps, duals=duals,
                             config=config, info=info, names=names)


def data_card_from_sums(sums: dict, *, pi, eps: dict, duals: dict, config, info: dict,
                        names: dict | None = None) -> dict:
  """The data card from `card_sums` (or the streamed equivalent)."""
  one, qs, ks = sums["one"], sums["q"], sums["keep"]
  n = int(round(float(sums["n"])))
  m = one["known"].shape[0]
  nm = _names(names, m, one["known_y"].shape[1], one["known_w"].shape[1])
  pi = np.asarray(pi, np.float64)
  prev_before = _ratio(one["s_known"], one["known"])
  prev_after = _ratio(qs["s_known"], qs["known"])
  members = one["s_known"]
  groups = []
  for k in range(m):
    groups.append(dict(
        name=nm["groups"][k], target=float(pi[k]), before=_py(prev_before[k]),
        after=_py(prev_after[k]), kept_expected=_py(_ratio(qs["s_known"][k], members[k])),
        kept_realised=_py(_ratio(ks["s_known"][k], members[k]))))

  cap = float(config.V)
  constraints, association = [], []
  kinds = {"assoc": ("labels", "y", config.use_labels),
           "proxy": ("proxies", "w", config.use_proxies)}
  after_moments = _moments(sums, pi)
  before_moments = _moments(dict(q=one, n=sums["n"]), pi)

  def constraint(name, moment, e, v):
    lam = float(v[0] - v[1])
    constraints.append(dict(name=name, moment=float(moment), eps=float(e),
                            residual=float(abs(moment) - e), price=lam,
                            at_cap=bool(abs(lam) >= cap * (1 - 1e-6))))

  for k in range(m):
    constraint(f"rep[{nm['groups'][k]}]", after_moments["rep"][k], eps["rep"][k],
               duals["v"]["rep"][:, k])
  for block, (key, col, on) in kinds.items():
    # P(s_k | x_r, known) − P(s_k | known), before (weight 1) and after (weight q).
    before = _ratio(one[f"s_{col}"], one[f"known_{col}"]) - prev_before[:, None]
    after = _ratio(qs[f"s_{col}"], qs[f"known_{col}"]) - prev_after[:, None]
    for k in range(m):
      for r in range(before.shape[1]):
        name = f"{block}[{nm['groups'][k]}, {nm[key][r]}]"
        association.append(dict(name=name, constrained=bool(on), before=_py(before[k, r]),
                                after=_py(after[k, r]),
                                moment_before=float(before_moments[block][k, r]),
                                moment_after=float(after_moments[block][k, r])))
        if on:
          constraint(name, after_moments[block][k, r], eps[block][k, r],
                     duals["v"][block][:, k, r])

  worst = max(constraints, key=lambda c: c["residual"])
  binding = [c["name"] for c in sorted(constraints, key=lambda c: -c["residual"])
             if c["residual"] > config.tol]
  expected = float(sums["q_sum"] / sums["n"])
  budget_gap = expected - float(config.eta)
  if abs(budget_gap) > config.tol:
    binding.append("budget")
  return dict(
      verdict="infeasible" if binding else "feasible",
      binding=binding,
      largest_violation=dict(name=worst["name"], residual=worst["residual"],
                             moment=worst["moment"], eps=worst["eps"]),
      n=n,
      kept=dict(expected=expected, realised=float(sums["keep_sum"] / sums["n"]),
                budget=float(config.eta), budget_gap=budget_gap),
      kish_ess=float(sums["q_sum"] ** 2 / max(sums["q_sq"], 1e-300)),
      groups=groups,
      association=association,
      constraints=constraints,
      mu=float(duals["mu"]),
      dual_steps=dict(stochastic=int(info["stochastic_steps"]), refine=int(info["refine_steps"]),
                      polish=int(info.get("polish_steps", 0))),
      solved_on=dict(sample=int(info.get("sample", n)), n=n,
                     # distinct (weighted) rows of the exact phases, see merge.py
                     exact_rows=int(info.get("exact_rows", info.get("sample", n))),
                     polish_rows=int(info.get("polish_rows", 0))),
      seconds={k: round(float(v), 3) for k, v in info.get("seconds", {}).items()},
      curvature=float(info["curvature"]),
      settings=dict(eta=float(config.eta), eps_rep=float(config.eps_rep),
                    eps_assoc=float(config.eps_assoc), tolerance=str(config.tolerance),
                    eps_proxy=config.get("eps_proxy"),
                    tolerance_proxy=config.get("tolerance_proxy"),
                    use_labels=bool(config.use_labels), use_proxies=bool(config.use_proxies),
                    use_utility=bool(config.use_utility), V=cap, tol=float(config.tol)),
  )


def _fmt(x, digits=3):
  return "–" if x is None else f"{x:.{digits}f}"


def card_markdown(card: dict, top: int = 5) -> str:
  """Short Markdown summary of a data card: verdict, kept data, groups, top associations."""
  kept = card["kept"]
  lines = [f"**M4 verdict: {card['verdict']}**"
           + (f" — binding: {', '.join(card['binding'])}" if card["binding"] else ""), "",
           f"Kept {kept['expected']:.3f} expected, {kept['realised']:.3f} realised "
           f"(budget {kept['budget']}); Kish ESS {card['kish_ess']:.0f} of {card['n']}. "
           f"Largest violation: {card['largest_violation']['name']} "
           f"(residual {card['largest_violation']['residual']:+.2e}).", "",
           "| group | target | before | after | kept |", "|---|---|---|---|---|"]
  lines += [f"| {g['name']} | {g['target']:.3f} | {_fmt(g['before'])} | {_fmt(g['after'])} | "
            f"{_fmt(g['kept_expected'])} |" for g in card["groups"]]
  rows = sorted((a for a in card["association"] if a["before"] is not None),
                key=lambda a: -abs(a["before"]))[:top]
  if rows:
    lines += ["", "| association P(s|x) − P(s) | before | after | constrained |",
              "|---|---|---|---|"]
    lines += [f"| {a['name']} | {_fmt(a['before'])} | {_fmt(a['after'])} | "
              f"{'yes' if a['constrained'] else 'no'} |" for a in rows]
  return "\n".join(lines) + "\n"
