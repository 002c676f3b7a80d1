"""Exact reference for M4: the primal QP solved by an interior-point solver (cvxpy + Clarabel).

For tests and benchmarks only (dense [N, K] constraint matrix); cvxpy is imported lazily so the
package does not depend on it.
"""
from __future__ import annotations

import numpy as np

from siglip_fair.balance import m4


def flatten(tree: dict) -> np.ndarray:
  """Concatenates a constraint tree {'rep': [m], 'assoc': [m, c], 'proxy': [m, p]} to [K]."""
  return np.concatenate([np.asarray(tree[k]).reshape(-1) for k in m4.BLOCKS])


def min_total_violation(ann: dict, config) -> tuple[float, np.ndarray]:
  """The smallest Σ_j t_j over q (E[q] = η, 0 <= q <= 1) with |E[q·b_j]| <= ε_j + t_j, t >= 0:
  an LP, the L1-minimal relaxation of the targets. Returns (Σ t, t [K]) (0 when feasible)."""
  import cvxpy as cp  # pylint: disable=g-import-not-at-top

  ex = m4.prepare(ann, config)
  totals = m4.totals(ex)
  bmat = bias_matrix(ex, m4.targets(config, totals))
  e = flatten(m4.tolerances(config, totals)).astype(np.float64)
  n = len(ex.u)
  q, t = cp.Variable(n), cp.Variable(len(e), nonneg=True)
  moments = bmat.T @ q / n
  problem = cp.Problem(cp.Minimize(cp.sum(t)), [cp.sum(q) == n * config.eta, moments <= e + t,
                                                 -moments <= e + t, q >= 0, q <= 1])
  problem.solve(solver=cp.CLARABEL, **TIGHT)
  return float(problem.value), np.maximum(np.asarray(t.value), 0.0)


def objective(q, u, eta) -> float:
  """E[½(q − η)² − u·q]."""
  q = np.asarray(q, np.float64)
  return float(np.mean(0.5 * (q - eta) ** 2 - np.asarray(u, np.float64) * q))


# Clarabel's defaults (1e-8) leave q off by ~1e-3 once V = 10³ weighs the penalty in: the
# objective's relative accuracy turns into the square root of it in q. These reach ~1e-5.
TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
             max_iter=400)


def solve_qp(ann: dict, config, *, soft: bool = False, merge: bool = False,
             eps: np.ndarray | None = None, tight: bool = True) -> dict:
  """Solves min E[½(q − η)² − u·q] s.t. E[q] = η, |E[q·b]| <= ε, 0 <= q <= 1 exactly.

  The same constraint set as `m4.balance` (targets, tolerances and switches from `config`).
  soft=False: hard constraints (no dual cap); infeasible targets give status 'infeasible'.
  soft=True: the problem M4's capped duals solve, min E[½(q − η)² − u·q] + V·Σ_j t_j s.t.
  |E[q·b_j]| <= ε_j + t_j, t >= 0 (V = config.V): always feasible; t [K] is each constraint's
  violation at the optimum. merge=True solves over distinct rows (s, known, y, w, u) weighted
  by their counts (np.unique here, independent of balance/merge.py): the objective is
  strictly convex, so identical rows share their optimal q and the problem is the same; for
  binary annotations of 10⁵ rows it is a few thousand variables. eps: per-constraint
  tolerances [K] in `flatten` order instead of config's (e.g. a relaxation to check).
  tight: Clarabel's tolerances at 1e-12 (`TIGHT`; ~3x slower) instead of its defaults.
  Returns dict(q [N] float64 or None, objective (the quadratic part only), status, pi, eps,
  lam [K] (signed duals, λ = v⁺ − v⁻ in `flatten` order, |λ| <= V when soft), violation [K]
  (|E[q·b]| − ε, > 0: violated), soft_objective (with the penalty when soft)).
  """
  import cvxpy as cp  # pylint: disable=g-import-not-at-top

  ex = m4.prepare(ann, config)
  totals = m4.totals(ex)
  pi = m4.targets(config, totals)
  if eps is None:
    eps = m4.tolerances(config, totals)
  else:
    shapes = m4.tolerances(config, totals)
    eps, i = dict(eps=np.asarray(eps, np.float64)), 0
    for k in m4.BLOCKS:
      size = shapes[k].size
      eps[k] = eps["eps"][i:i + size].reshape(shapes[k].shape)
      i += size
    del eps["eps"]
  n = ex.u.shape[0]
  inverse, weight = np.arange(n), np.ones(n)
  if merge:
    key = np.concatenate([np.asarray(x, np.float64).reshape(n, -1) for x in ex], axis=1)
    _, first, inverse, weight = np.unique(key, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    ex = m4.Examples(*(np.asarray(x)[first] for x in ex))
  bmat = bias_matrix(ex, pi)
  e = flatten(eps).astype(np.float64)
  u = np.asarray(ex.u, np.float64)
  weight = np.asarray(weight, np.float64)
  q = cp.Variable(len(u))
  moments = bmat.T @ cp.multiply(weight, q)
  # Sums rather than means keep the solver's absolute tolerances meaningful; T = N·t.
  slack = cp.Variable(len(e), nonneg=True) if soft else 0.0
  upper = moments <= n * e + slack
  lower = -moments <= n * e + slack
  cost = 0.5 * cp.sum(cp.multiply(weight, cp.square(q - config.eta))) - (weight * u) @ q
  if soft:
    cost = cost + float(config.V) * cp.sum(slack)
  problem = cp.Problem(cp.Minimize(cost), [weight @ q == n * config.eta, upper, lower, q >= 0,
                                           q <= 1])
  problem.solve(solver=cp.CLARABEL, **(TIGHT if tight else {}))
  qd = None if q.value is None else np.clip(q.value, 0.0, 1.0)  # per distinct row
  qv = None if qd is None else qd[inverse]
  u = u[inverse]
  out = dict(q=qv, objective=None if qv is None else objective(qv, u, config.eta),
             status=problem.status, pi=pi, eps=eps, lam=None, violation=None,
             soft_objective=None)
  if qv is not None:
    # Sum scaling leaves the duals of |Σ q b| <= N ε equal to those of |E[q b]| <= ε.
    out["lam"] = np.asarray(upper.dual_value) - np.asarray(lower.dual_value)
    out["violation"] = np.abs(bmat.T @ (weight * qd)) / n - e
    out["soft_objective"] = out["objective"] + (
        float(config.V) * float(np.maximum(out["violation"], 0).sum()) if soft else 0.0)
  return out


def bias_matrix(ex, pi) -> np.ndarray:
  """The materialised b of every example, [N, K] float64 in `flatten` order (small N only)."""
  n = ex.u.shape[0]
  b = m4.bias_vectors(*(np.asarray(x, np.float64) for x in ex[:4]), np.asarray(pi, np.float64))
  return np.concatenate([b[k].reshape(n, -1) for k in m4.BLOCKS], axis=1)


def random_instance(seed: int, n: int, m: int = 2, c: int = 10, p: int = 0, *,
                    unknown: float = 0.3, disjoint: bool = False, utility: bool = False,
                    target_jitter: float = 0.1) -> tuple[dict, np.ndarray]:
  """A random biased annotations dict and random targets π near the data's prevalence.

  Labels are one-hot or absent (each of the c + 1 cases equally likely); groups depend on the
  label (association), and so do proxies; `disjoint` makes groups one-hot, else each group is
  an independent coin (overlapping). Unknown attributes have s = 0. Returns (ann, pi [m]).
  """
  rng = np.random.default_rng(seed)
  label = rng.integers(0, c + 1, n) if c else np.zeros(n, int)  # c = no label
  y = np.eye(c + 1, dtype=np.float32)[label][:, :c]
  logit = rng.normal(-0.5, 0.7, (m, c + 1))[:, label].T  # [n, m] group logits given label
  if disjoint:
    g = np.argmax(logit + rng.gumbel(size=logit.shape), axis=1)  # softmax(logit) sample
    s = np.eye(m, dtype=np.float32)[g]
  else:
    s = (rng.random((n, m)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
  known = (rng.random(n) >= unknown).astype(np.float32)
  s *= known[:, None]
  wl = rng.normal(-1.5, 1.0, (p, c + 1))[:, label].T
  w = (rng.random((n, p)) < 1 / (1 + np.exp(-wl))).astype(np.float32)
  u = (rng.uniform(0, 0.2, n) if utility else np.zeros(n)).astype(np.float32)
  prev = (s * known[:, None]).sum(0) / max(known.sum(), 1)
  pi = np.clip(prev + rng.uniform(-target_jitter, target_jitter, m), 0.02, 0.98)
  return dict(s=s, known=known, y=y, w=w, u=u), pi.astype(np.float32)
