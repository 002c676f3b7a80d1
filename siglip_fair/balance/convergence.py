"""The exact phase of M4's dual ascent: the cap ladder and the KKT stopping criterion.

`converge` runs FISTA on exact full-data gradients (dual.py's passes) at each cap of
`ladder` in turn, each rung until the KKT residual (`card.kkt_residual`) meets optim.kkt_tol
or stalls at float32's floor; between rungs `tangent` (from the dual's curvature, `hessian`)
predicts the next rung's solution, and the climb stops once the solution has settled
(`_structure`, `q_change`). dual.solve and dual.polish call it; see m4.py for the math.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from siglip_fair.balance.card import kkt_residual
from siglip_fair.balance.dual import (AXIS, Layout, _flat, _host, _run, _sweep, _varying, flat,
                                      fista_start, gradient, refine_carry, unflat)
from siglip_fair.balance.m4 import Consts, Examples, b_dot, primal_q


@functools.partial(jax.jit, static_argnames=("layout",))
def hessian(lam, mu, ex: Examples, mask, consts: Consts, *, layout: Layout):
  """E[free · ã ãᵀ], ã = [b; 1] in `flat` order, free = 1 where 0 < q < 1: [K + 1, K + 1].

  The dual's curvature at (λ, µ) (clipped examples do not move); one pass, O(rows · K²).
  Only its rows and columns for active and capped constraints are used (`tangent`).
  """
  def local(ex, mask, lam, mu, consts):
    def fn(batch, m):
      d = (batch.s - consts.pi) * batch.known
      z = consts.eta + batch.u - mu - b_dot(lam, d, batch.y, batch.w)
      weight = m * ((z > 0) & (z < 1))
      rows = d.shape[0]
      a = jnp.concatenate([d, (d[:, :, None] * batch.y[:, None, :]).reshape(rows, -1),
                           (d[:, :, None] * batch.w[:, None, :]).reshape(rows, -1),
                           jnp.ones((rows, 1), d.dtype)], axis=1)
      return (a * weight[:, None]).T @ a
    k = sum(x.size for x in jax.tree.leaves(consts.eps)) + 1
    return _sweep(fn, ex, mask, layout.batch, jnp.zeros((k, k))) / layout.total
  return _run(layout, local, (ex, mask), (lam, mu, consts))


def tangent(h: np.ndarray, lam: np.ndarray, cap: float) -> np.ndarray:
  """d(λ, µ)/dV along the solution path of the capped dual at a solution (λ, µ) for cap V:
  [K + 1] (µ last), exact while no constraint or example changes status.

  Capped duals move with the cap (±1); active ones (0 < |λ| < V) and µ keep their conditions
  E[q b_A] = ±ε_A, E[q] = η, so H_AA d_A = −H_AC d_C; slack ones (λ = 0) stay. h: `hessian`.
  """
  k = lam.size
  capped = np.abs(lam) >= cap * (1 - 1e-6)
  d = np.zeros(k + 1)
  if not capped.any():
    return d
  d[:k][capped] = np.sign(lam[capped])
  active = np.append((lam != 0) & ~capped, True)  # and µ
  hh = np.asarray(h, np.float64)
  rhs = -hh[np.ix_(active, np.append(capped, False))] @ d[:k][capped]
  d[active] = np.linalg.lstsq(hh[np.ix_(active, active)], rhs, rcond=1e-7)[0]
  return d


def ladder(cap: float, config) -> list[float]:
  """The caps the exact phase solves at in turn: ladder_start, × ladder_factor, ..., V.

  Solving with a small cap first and raising it keeps the dual well scaled: past the cap
  where the set of violated constraints settles, the solution is affine in V (capped duals
  are ±V, active ones move along `tangent`), so each rung starts where the last one's
  tangent points and needs few steps; a cold start at V = 10³ would have to climb there.
  """
  o = config.optim
  start, factor = float(o.get("ladder_start", 1.0)), float(o.get("ladder_factor", 10.0))
  caps = [float(cap)]
  if start <= 0 or factor <= 1:
    return caps
  while caps[-1] / factor >= start * (1 - 1e-9):
    caps.append(caps[-1] / factor)
  return caps[::-1]


@functools.partial(jax.jit, static_argnames=("layout",))
def q_change(lam0, mu0, lam1, mu1, ex: Examples, mask, consts: Consts, *, layout: Layout):
  """max |q(λ₁, µ₁) − q(λ₀, µ₀)| over the solver's real rows, one pass: []."""
  def local(ex, mask, lam0, mu0, lam1, mu1, consts):
    def fn(batch, m):
      q0 = primal_q(lam0, mu0, batch, consts.pi, consts.eta)[0]
      q1 = primal_q(lam1, mu1, batch, consts.pi, consts.eta)[0]
      return jnp.max(jnp.abs(q1 - q0) * (m > 0), initial=0.0)
    steps = mask.shape[1] // layout.batch

    def body(acc, t):
      take = lambda x: _flat(jax.lax.dynamic_slice_in_dim(x, t * layout.batch, layout.batch,
                                                           axis=1))
      return jnp.maximum(acc, fn(jax.tree.map(take, ex), take(mask))), None

    acc = jax.lax.scan(body, _varying(jnp.float32(0)), jnp.arange(steps))[0]
    return jax.lax.pmax(acc, AXIS)
  return _run(layout, local, (ex, mask), (lam0, mu0, lam1, mu1, consts))


def _structure(lam_flat: np.ndarray, cap: float) -> np.ndarray:
  """Each constraint's status: 0 slack (λ = 0), ±1 active (sign), ±2 capped (sign)."""
  capped = np.abs(lam_flat) >= cap * (1 - 1e-6)
  return (np.sign(lam_flat) * np.where(capped, 2, 1)).astype(np.int8)


def converge(lam, mu, rows, consts: Consts, unit: float, config, caps, budget: int,
             eps_flat: np.ndarray, sampled: bool = False):
  """The exact phase: FISTA on exact gradients at each cap of `caps` in turn, each run until
  the KKT residual (`card.kkt_residual`) is at most optim.kkt_tol, checked every
  optim.check_every steps, at most `budget` steps in all; a rung also stops when its residual
  stops improving below optim.kkt_stall (`stalled`: float32's floor), which counts as
  converged.
  Between caps, the tangent predicts the next rung's solution.

  The climb stops early once the solution has settled: when no dual is at the cap (then the
  same point is optimal for every higher cap), or when two rungs have the same status for
  every constraint and the same q (max change <= optim.settle_tol). Past that point the
  primal solution no longer depends on V (q is affine in V along the path and bounded, so
  constant) and the duals are affine in V: the prices at V follow from the two rungs by
  extrapolation, and q is computed from the lower rung's duals, which float32 resolves far
  better than duals of 10³ (where µ ~ 10³ rounds q at ~10⁻⁴).

  sampled: the rows are a uniform sample of the data; then residuals under a tenth of the
  sample's standard error of a moment (0.1/√n) are noise and meet the criterion.

  rows: (layout, blocks, mask) of the solver's rows; lam: a folded constraint tree.
  Returns (λ_q, µ_q, λ_V, µ_V, info, path): duals that give q, the duals at the last cap
  (the prices; the same as λ_q unless the solution settled below it), info (steps,
  converged, kkt, caps, kkt_by_cap, kkt_tol, kkt_stall, stalled, settled_at) and path, the
  (cap, (λ, µ)) solved at each rung.
  """
  o = config.optim
  layout, bex, mask = rows
  tol, check = float(o.get("kkt_tol", 1e-7)), max(1, int(o.get("check_every", 25)))
  if sampled:
    tol = max(tol, 0.1 / np.sqrt(layout.total))
  stall = max(float(o.get("kkt_stall", 1e-5)), tol)
  settle = float(o.get("settle_tol", 1e-5))
  lr = jnp.float32(unit)
  used, history, path, stalled, settled = 0, [], [], False, None

  def residual(lam, mu, cap):
    g, gmu = gradient(_host(lam), np.float32(mu), bex, mask,
                      consts._replace(cap=jnp.float32(cap)), layout=layout)
    return float(kkt_residual(flat(_host(lam)), flat(_host(g)), float(gmu), eps_flat, cap,
                              float(mu)).max())

  for cap in caps:
    c = consts._replace(cap=jnp.float32(cap))
    if path:
      last, _ = path[-1]
      lam_flat = flat(_host(lam))
      if not np.any(np.abs(lam_flat) >= last * (1 - 1e-6)):
        settled = last  # no dual at the cap: the same (λ, µ) is optimal at any higher one
        break
      d = tangent(np.asarray(hessian(_host(lam), np.float32(mu), bex, mask, c, layout=layout)),
                  lam_flat, last)
      moved = lam_flat + (cap - last) * d[:-1]
      # An active dual the prediction carries through 0 stops there (it turns slack).
      moved = np.where(np.sign(moved) * np.sign(lam_flat) < 0, 0.0, moved)
      lam = jax.tree.map(jnp.asarray, unflat(np.clip(moved, -cap, cap), lam))
      mu = jnp.float32(float(mu) + (cap - last) * d[-1])
    r = residual(lam, mu, cap)
    carry, best, since = fista_start(lam, mu), r, 0
    # The first rung always takes one segment: the stochastic phase's average is what the
    # exact phase starts from, not its answer.
    first = not path and budget > 0
    # Stop at the criterion, at the budget, or when below kkt_stall the residual stops
    # improving (no 10 % gain in 8 checks): float32 rounding of q (~2⁻²⁴·|µ| per example, and
    # µ reaches ~10³ with duals at a cap of 10³) is the floor. Above it, slow progress is
    # still progress (stopping there can leave a violated constraint's dual short of the cap).
    while first or (r > tol and used < budget and not (since >= 8 and r <= stall)):
      first = False
      steps = min(check, budget - used)  # a budget that is not whole checks compiles once more
      carry = refine_carry(_host(carry), bex, mask, c, lr, layout=layout, steps=steps)
      used += steps
      lam, mu = carry[0]
      r = residual(lam, mu, cap)
      best, since = (r, 0) if r < 0.9 * best else (best, since + 1)
    history.append(r)
    stalled = r > tol and since >= 8 and r <= stall
    path.append((cap, (lam, mu)))
    if len(path) >= 2 and cap < caps[-1]:
      (c0, (lam0, mu0)), (c1, _) = path[-2], path[-1]
      same = np.array_equal(_structure(flat(_host(lam0)), c0), _structure(flat(_host(lam)), c1))
      if same and float(q_change(_host(lam0), np.float32(mu0), _host(lam), np.float32(mu), bex,
                                 mask, c, layout=layout)) <= settle:
        settled = c0
        break
  lam_v, mu_v = lam, mu
  if settled is not None and len(path) >= 2 and path[-2][0] == settled:
    # Affine in V from the two settled rungs; q from the lower one.
    (c0, (lam0, mu0)), (c1, (lam1, mu1)) = path[-2:]
    a = (caps[-1] - c0) / (c1 - c0)
    l0, l1 = flat(_host(lam0)), flat(_host(lam1))
    lam_v = unflat(np.clip(l0 + a * (l1 - l0), -caps[-1], caps[-1]), _host(lam0))
    mu_v = float(mu0) + a * (float(mu1) - float(mu0))
    lam, mu = lam0, mu0
  converged = history[-1] <= tol or stalled
  info = dict(steps=used, converged=bool(converged), kkt=history[-1],
              caps=[float(c) for c in caps], kkt_by_cap=history, kkt_tol=tol,
              kkt_stall=stall, stalled=bool(stalled), settled_at=settled)
  return lam, mu, lam_v, mu_v, info, path
