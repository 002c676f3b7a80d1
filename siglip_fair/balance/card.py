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


def _prevalence(weight, s, known):
  """P(s_k | known_k) under example weights [N]: [m]."""
  wk = weight[:, None] * known
  return _ratio((wk * s).sum(0), wk.sum(0))


def _association(weight, s, known, cols):
  """P(s_k | col_r, known_k) − P(s_k | known_k) under example weights [N]: [m, k]."""
  wk = weight[:, None] * known
  return _ratio((wk * s).T @ cols, wk.T @ cols) - _prevalence(weight, s, known)[:, None]


def data_card(ann: dict, q, keep, *, pi, eps: dict, duals: dict, config, info: dict,
              names: dict | None = None) -> dict:
  """JSON-serialisable summary of an M4 run.

  ann: the annotations given to `balance`; q [N]; keep bool [N]; pi [m]; eps, duals: as in
  m4 (constraint trees); info: solver counters from `m4.solve`.
  """
  s = np.asarray(ann["s"], np.float64)
  n, m = s.shape
  known = np.asarray(ann["known"], np.float64)
  known = np.repeat(known[:, None], m, axis=1) if known.ndim == 1 else known
  cols = {"assoc": np.asarray(ann.get("y", np.zeros((n, 0))), np.float64),
          "proxy": np.asarray(ann.get("w", np.zeros((n, 0))), np.float64)}
  nm = _names(names, m, cols["assoc"].shape[1], cols["proxy"].shape[1])
  q = np.asarray(q, np.float64)
  keep = np.asarray(keep, np.float64)
  pi = np.asarray(pi, np.float64)
  ones = np.ones(n)
  d = (s - pi) * known

  groups = []
  prev_before, prev_after = _prevalence(ones, s, known), _prevalence(q, s, known)
  members = (s * known).sum(0)
  for k in range(m):
    groups.append(dict(
        name=nm["groups"][k], target=float(pi[k]), before=_py(prev_before[k]),
        after=_py(prev_after[k]),
        kept_expected=_py(_ratio((q * s[:, k] * known[:, k]).sum(), members[k])),
        kept_realised=_py(_ratio((keep * s[:, k] * known[:, k]).sum(), members[k]))))

  cap = float(config.V)
  constraints, association = [], []
  kinds = {"assoc": ("labels", config.use_labels), "proxy": ("proxies", config.use_proxies)}

  def constraint(name, moment, e, v):
    lam = float(v[0] - v[1])
    constraints.append(dict(name=name, moment=float(moment), eps=float(e),
                            residual=float(abs(moment) - e), price=lam,
                            at_cap=bool(abs(lam) >= cap * (1 - 1e-6))))

  for k in range(m):
    constraint(f"rep[{nm['groups'][k]}]", (q * d[:, k]).mean(), eps["rep"][k],
               duals["v"]["rep"][:, k])
  for block, (key, on) in kinds.items():
    x = cols[block]
    before, after = _association(ones, s, known, x), _association(q, s, known, x)
    mom_before, mom_after = d.T @ x / n, (q[:, None] * d).T @ x / n
    for k in range(m):
      for r in range(x.shape[1]):
        name = f"{block}[{nm['groups'][k]}, {nm[key][r]}]"
        association.append(dict(name=name, constrained=bool(on), before=_py(before[k, r]),
                                after=_py(after[k, r]), moment_before=float(mom_before[k, r]),
                                moment_after=float(mom_after[k, r])))
        if on:
          constraint(name, mom_after[k, r], eps[block][k, r], duals["v"][block][:, k, r])

  worst = max(constraints, key=lambda c: c["residual"])
  binding = [c["name"] for c in sorted(constraints, key=lambda c: -c["residual"])
             if c["residual"] > config.tol]
  budget_gap = float(q.mean() - config.eta)
  if abs(budget_gap) > config.tol:
    binding.append("budget")
  return dict(
      verdict="infeasible" if binding else "feasible",
      binding=binding,
      largest_violation=dict(name=worst["name"], residual=worst["residual"],
                             moment=worst["moment"], eps=worst["eps"]),
      n=n,
      kept=dict(expected=float(q.mean()), realised=float(keep.mean()), budget=float(config.eta),
                budget_gap=budget_gap),
      kish_ess=float(q.sum() ** 2 / max((q ** 2).sum(), 1e-300)),
      groups=groups,
      association=association,
      constraints=constraints,
      mu=float(duals["mu"]),
      dual_steps=dict(stochastic=int(info["stochastic_steps"]), refine=int(info["refine_steps"])),
      curvature=float(info["curvature"]),
      settings=dict(eta=float(config.eta), eps_rep=float(config.eps_rep),
                    eps_assoc=float(config.eps_assoc), tolerance=str(config.tolerance),
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
