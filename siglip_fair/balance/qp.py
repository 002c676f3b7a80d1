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


def objective(q, u, eta) -> float:
  """E[½(q − η)² − u·q]."""
  q = np.asarray(q, np.float64)
  return float(np.mean(0.5 * (q - eta) ** 2 - np.asarray(u, np.float64) * q))


def solve_qp(ann: dict, config) -> dict:
  """Solves min E[½(q − η)² − u·q] s.t. E[q] = η, |E[q·b]| <= ε, 0 <= q <= 1 exactly.

  The same constraint set as `m4.balance` (targets, tolerances and switches from `config`) but
  hard, with no dual cap. Returns dict(q [N] float64 or None, objective, status, pi, eps).
  """
  import cvxpy as cp  # pylint: disable=g-import-not-at-top

  ex = m4.prepare(ann, config)
  totals = m4.totals(ex)
  pi, eps = m4.targets(config, totals), m4.tolerances(config, totals)
  n = ex.u.shape[0]
  b = m4.bias_vectors(*(np.asarray(x, np.float64) for x in ex[:4]), np.asarray(pi, np.float64))
  bmat = np.concatenate([b[k].reshape(n, -1) for k in m4.BLOCKS], axis=1)
  e = flatten(eps).astype(np.float64)
  u = np.asarray(ex.u, np.float64)
  q = cp.Variable(n)
  moments = bmat.T @ q
  # Sums rather than means keep the solver's absolute tolerances meaningful.
  problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(q - config.eta) - u @ q),
                       [cp.sum(q) == n * config.eta, moments <= n * e, -moments <= n * e,
                        q >= 0, q <= 1])
  problem.solve(solver=cp.CLARABEL)
  qv = None if q.value is None else np.clip(q.value, 0.0, 1.0)
  return dict(q=qv, objective=None if qv is None else objective(qv, u, config.eta),
              status=problem.status, pi=pi, eps=eps)


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
