"""The M4 data card: what balancing did to the data, and whether the targets were met.

Definitions (all "among known" quantities use examples whose attribute k is known):
  prevalence of group k     P(s_k | known), unweighted (before) or weighted by q (after);
  association (k, r)        P(s_k | y_r, known) − P(s_k | known), before / after, and the same
                            with proxy w_j in place of y_r; 0 means independence;
  moment                    the constrained quantity E[q·b] (mean over all N; q = 1 before);
  residual                  |moment| − ε: > 0 is a violation;
  price                     the dual of the constraint (λ = v⁺ − v⁻; |λ| = V means capped);
  Kish ESS                  (Σq)² / Σq², the sample size the weighted data are worth.
The verdict is 'infeasible' when some constraint's residual exceeds `config.tol` (or E[q]
misses η by more). The binding constraints are the ones the solution does not meet: those whose
price reached the cap V with a positive residual (no price up to V meets them: at the exact
soft-constraint optimum these are exactly the violated constraints) and any whose residual
exceeds tol; listed worst first, each in `relax` with its violation, price and the ε that would
make it met (`relax_to`, its |moment|). Relaxing every binding constraint to its relax_to makes
the targets feasible, and this q is optimal for them within `convergence.gap`: a certificate.
Among all relaxations that make the targets feasible, this one has the smallest total
Σ (relax_to − ε) once V is past the point where the violated set settles (V's L1 penalty picks
it); fewer constraints might do with larger relaxations, which only a combinatorial search
finds. `convergence` says whether the exact phase met its criterion (convergence.converge) and gives
the KKT residual and the gap on all N rows.
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


def card_sums(ann: dict, q, keep, u=None) -> dict:
  """The float64 sums a data card is made of, over in-memory annotations (numpy reference of
  the streamed `stream.card_pass`; sums of chunks add up).

  For each weight ('one', 'q', 'keep'): known [m], s_known [m] and, per column block x in
  (y, w), known_x / s_x [m, cols] = Σ weight·known_k·x_r (·s_k); plus q_sum, q_sq, keep_sum, n
  and uq = Σ u·q (u [N]: the utility M4 used, None: zeros).
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
  uq = 0.0 if u is None else float(np.asarray(u, np.float64) @ q)
  out.update(q_sum=q.sum(), q_sq=(q * q).sum(), keep_sum=keep.sum(), n=float(n), uq=uq)
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
  u = ann.get("u") if config.use_utility else None
  return data_card_from_sums(card_sums(ann, q, keep, u), pi=pi, eps=eps, duals=duals,
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
  binding = [c for c in sorted(constraints, key=lambda c: -c["residual"])
             if (c["at_cap"] and c["residual"] > 0) or c["residual"] > config.tol]
  relax = [dict(name=c["name"], moment=c["moment"], eps=c["eps"], violation=c["residual"],
                price=c["price"], relax_to=abs(c["moment"])) for c in binding]
  binding = [c["name"] for c in binding]
  expected = float(sums["q_sum"] / sums["n"])
  budget_gap = expected - float(config.eta)
  failing = worst["residual"] > config.tol or abs(budget_gap) > config.tol
  if abs(budget_gap) > config.tol:
    binding.append("budget")
  convergence = _convergence(sums, constraints, duals, budget_gap, config, info)
  return dict(
      verdict="infeasible" if failing else "feasible",
      binding=binding,
      relax=relax,
      convergence=convergence,
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


def kkt_residual(lam, moments, budget_gap: float, eps, cap: float, mu: float = 0.0
                 ) -> np.ndarray:
  """How far duals λ [K] are from optimal, per constraint, in moment units: [K + 1] (budget
  last). The optimality conditions of the capped dual, constraint by constraint
  (m = E[q·b_j]):
    λ = 0:          |m| <= ε          (slack; residual: its excess over ε)
    0 < |λ| < V:    sign(λ)·m = ε     (active, met with equality)
    |λ| = V:        sign(λ)·m >= ε    (capped: violated, or met at the cap)
  plus E[q] = η, to within what float32 µ can resolve (half its rounding step, 2⁻²⁴|µ|: with
  duals at the cap µ reaches ~10³, where one step moves E[q] by ~10⁻⁵). All zero at the exact
  soft-constraint optimum.
  """
  lam, moments, eps = (np.asarray(x, np.float64) for x in (lam, moments, eps))
  sign = np.sign(lam)
  capped = np.abs(lam) >= cap * (1 - 1e-6)
  r = np.where(lam == 0, np.maximum(np.abs(moments) - eps, 0.0),
               np.where(capped, np.maximum(eps - sign * moments, 0.0),
                        np.abs(sign * moments - eps)))
  return np.append(r, max(abs(budget_gap) - abs(mu) * 2.0 ** -24, 0.0))


def _convergence(sums, constraints, duals, budget_gap, config, info) -> dict:
  """The exact phase's criterion as the solver saw it, and the same on all N rows.

  gap = f(q) − D(λ, µ) for the targets relaxed to what q achieves (ε' = max(ε, |m|) and the
  budget E[q]), with f(q) = E[½(q − η)² − u·q] and D the dual function of that problem at the
  card's duals:
    gap = Σ_j |λ_j| (ε'_j − sign(λ_j) m_j) >= 0,
  an upper bound on how much f(q) exceeds the optimum of the relaxed problem (q is feasible
  for it); 0 at the exact optimum. It does not charge the soft penalty V·Σ max(0, |m| − ε),
  which would turn moments off by float rounding (1e-8) into ~1e-5 at V = 10³.
  """
  conv = dict(info.get("convergence") or {})
  lam = np.array([c["price"] for c in constraints], np.float64)
  m = np.array([c["moment"] for c in constraints], np.float64)
  eps = np.array([c["eps"] for c in constraints], np.float64)
  n = float(sums["n"])
  eta = float(config.eta)
  f = (0.5 * float(sums["q_sq"]) - eta * float(sums["q_sum"]) - float(sums.get("uq", 0.0))) / n \
      + 0.5 * eta * eta
  gap = float(np.sum(np.abs(lam) * (np.maximum(eps, np.abs(m)) - np.sign(lam) * m)))
  kkt_all = kkt_residual(lam, m, budget_gap, eps, float(config.V), float(duals["mu"]))
  return dict(converged=bool(conv.get("converged", False)), criterion=(
      f"KKT residual <= optim.kkt_tol = {conv.get('kkt_tol')}, or stalled below "
      f"optim.kkt_stall = {conv.get('kkt_stall')} (float32's floor), on the "
      f"{conv.get('rows', 'solve')} rows"), stalled=bool(conv.get("stalled", False)),
              kkt=_py(conv.get("kkt", np.nan)), steps=int(conv.get("steps", 0)),
              caps=list(conv.get("caps", [])), settled_at=conv.get("settled_at"),
              kkt_all_rows=float(kkt_all.max()),
              objective=f, gap=gap, gap_relative=_py(gap / abs(f)) if f else None)


def _fmt(x, digits=3):
  return "–" if x is None else f"{x:.{digits}f}"


def _convergence_line(conv: dict | None) -> str:
  if not conv:
    return ""
  kkt = conv.get("kkt")
  return (f"Exact phase: {'converged' if conv['converged'] else 'NOT converged'} after "
          f"{conv['steps']} steps (KKT residual {_fmt(kkt, 1) if kkt is None else f'{kkt:.1e}'}"
          f"; on all rows {conv['kkt_all_rows']:.1e}; gap {conv['gap']:.1e}).")


def card_markdown(card: dict, top: int = 5) -> str:
  """Short Markdown summary of a data card: verdict, kept data, groups, top associations."""
  kept = card["kept"]
  lines = [f"**M4 verdict: {card['verdict']}**"
           + (f" — binding: {', '.join(card['binding'])}" if card["binding"] else ""), "",
           f"Kept {kept['expected']:.3f} expected, {kept['realised']:.3f} realised "
           f"(budget {kept['budget']}); Kish ESS {card['kish_ess']:.0f} of {card['n']}. "
           f"Largest violation: {card['largest_violation']['name']} "
           f"(residual {card['largest_violation']['residual']:+.2e}).",
           _convergence_line(card.get("convergence")), ""]
  if card.get("relax"):
    lines += ["Binding (price at the cap, or beyond tol): relaxing each ε to `relax_to` makes "
              "the targets feasible.", "", "| constraint | ε | moment | violation | price | "
              "relax_to |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['eps']:.4f} | {r['moment']:+.4f} | {r['violation']:.2e} | "
              f"{r['price']:+.3g} | {r['relax_to']:.4f} |" for r in card["relax"][:top]]
    if len(card["relax"]) > top:
      lines.append(f"| … and {len(card['relax']) - top} more | | | | | |")
    lines.append("")
  lines += ["| group | target | before | after | kept |", "|---|---|---|---|---|"]
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
