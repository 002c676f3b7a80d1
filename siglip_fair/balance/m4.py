"""M4 (Multi-Modal Moment Matching): per-example keep probabilities by dual ascent (SPEC §2).

For N examples with m groups, c labels and p proxies:
  d = (s − π)·known                           [N, m]
  b = [d ; vec(d ⊗ y) ; vec(d ⊗ w)]           the statistics the constraints average
  a = [b ; −b]                                two-sided form, one dual v ≥ 0 per row

Primal: minimise E[½(q − η)² − u·q] s.t. E[q] = η, E[q·a] ≤ ε, 0 ≤ q ≤ 1. The Lagrangian
separates per example, so q = clip(η + u − µ − vᵀa, 0, 1) (`q_from_duals`). b is never
materialised: its blocks are outer products, so vᵀa = bᵀλ with λ = v⁺ − v⁻ is a contraction
over (d, y, w) (`b_dot`), and so is Σ q·b (`moment_sums`); memory is O(batch · m · (c + p)).

The dual is maximised in two phases (dual.py, data-parallel over a device mesh), both pure
functions of (duals, mini-batch):
  1. projected stochastic ascent, SPEC's update, over shuffled fixed-size padded mini-batches
     (`dual.dual_step` under `lax.scan`), with a 1/t step and tail averaging;
  2. the exact phase (`convergence.converge`): accelerated (FISTA) proximal ascent on exact
     full-data gradients, each step one pass, run until a stated criterion holds: the KKT residual
     (every constraint's optimality condition, in moment units, `card.kkt_residual`) at most
     optim.kkt_tol = 1e-7, or stalled below optim.kkt_stall = 1e-5 (float32's floor); at most
     optim.refine_steps steps; the card reports `converged`, the residual and a gap. It climbs
     a ladder of caps 1, 10, ..., V: past the cap where the set of violated constraints
     settles the solution is affine in V, so each rung starts where the last one's tangent
     (`convergence.tangent`, from the dual's curvature `convergence.hessian`) points, and the
     climb stops once q no longer moves with the cap, where float32 still resolves q (duals
     of 10³ would round it at ~10⁻⁴); the prices at V follow by extrapolation. A cold start
     at V = 10³ had to climb there in steps of the natural dual scale and stopped short of
     the cap.
Steps are Jacobi-scaled (coordinate j moves by lr / E[a_j²]) and then by 1 / L, where L is the
largest eigenvalue of the scaled Gram matrix E[ã ãᵀ], ã = [1; b], an upper bound on the dual
curvature found by power iteration (`dual.curvature`). A last pass sets µ by bisection so
E[q] = η (stream.py, which also runs M4 over shards of any size).

Constraint-shaped values are trees {'rep': [m], 'assoc': [m, c], 'proxy': [m, p]} (c = 0 when
labels are off, p = 0 when proxies are off); duals v add a leading axis of 2 (upper: b ≤ ε,
lower: −b ≤ ε).

The cap V on the duals makes the constraints soft: it is the "enforcement level", the largest
price (objective increase per unit of moment violation) M4 pays to satisfy a constraint. For V
above every optimal dual of a feasible problem the solution is the hard-constrained one; on
infeasible targets M4 solves min E[½(q − η)² − u·q] + V·Σ_j max(0, |E[q·b_j]| − ε_j) exactly
(qp.solve_qp(soft=True) is its reference): the violated constraints' duals sit at ±V and the
card names them as binding, with the relaxation that makes the targets feasible.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from siglip_fair.balance import card as cardlib
from siglip_fair.balance import inputs

BLOCKS = ("rep", "assoc", "proxy")


def default_config() -> ml_collections.ConfigDict:
  """Default M4 settings (converge to the exact QP on N ≤ 20k, m ≤ 3, c ≤ 20; see tests)."""
  c = ml_collections.ConfigDict()
  c.eta = 0.9            # budget: E[q], the expected kept fraction, in (0, 1].
  c.pi = None            # targets [m] in [0, 1]; None: each group's prevalence among known.
  c.eps_rep = 0.01       # |E[q (s_k − π_k) known]| <= eps_rep (always absolute).
  c.eps_assoc = 0.01     # |E[q (s_k − π_k) known y_r]| <= eps_assoc (same for proxies w_j).
  # 'absolute': eps_assoc as is. 'relative': the bound for label r is eps_assoc · P(y_r)
  # (proxy j: eps_assoc · P(w_j)), i.e. |E[q (s_k − π_k) known | y_r]| <= eps_assoc, so a rare
  # label is held to the same conditional gap as a common one.
  c.tolerance = "absolute"
  # Per family: proxies may have their own bound and mode (None: eps_assoc / tolerance).
  c.eps_proxy = None
  c.tolerance_proxy = None
  c.use_labels = True    # association constraints on y (off: prevalence only, i.e. raking).
  c.use_proxies = False  # association constraints on w as well.
  c.use_utility = False  # u enters q (prefers keeping high-utility examples).
  c.V = 1e3              # dual cap: the enforcement level (price per unit violation).
  c.seed = 0             # mini-batch order; q depends on it, never on the keep-mask key.
  c.tol = 1e-3           # verdict: a constraint fails when |moment| > eps + tol.
  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 1024
  c.optim.steps = 1000        # stochastic steps, rounded up to whole epochs (0: none).
  c.optim.lr = 1.0            # stochastic step in units of 1 / L (Jacobi-scaled), ...
  c.optim.decay_steps = 100   # ... decayed as lr / (1 + t / decay_steps).
  c.optim.average_from = 0.5  # average the stochastic iterates over the last half.
  # The exact phase (convergence.converge): FISTA on exact full-data gradients (each step one
  # pass) until the KKT residual (card.kkt_residual: how far each constraint is from its optimality
  # condition, in moment units, and |E[q] − η|) is at most kkt_tol, checked every check_every
  # steps, at most refine_steps steps. A residual that stops improving (8 checks in a row gain
  # under 10 %) below kkt_stall has met float32's floor (q rounds at ~2⁻²⁴·|µ| per example,
  # and µ reaches ~10³ with duals at the cap): that converges too. The card says whether it
  # `converged`. The caps ladder_start, × ladder_factor, ..., V are solved in turn
  # (convergence.ladder; ladder_start 0: V alone), each from the last one's solution moved along
  # the solution path; the climb stops once two rungs agree on every constraint's status and on q
  # to settle_tol (then q is the same at V, convergence.converge).
  c.optim.refine_steps = 3000
  c.optim.kkt_tol = 1e-7
  c.optim.kkt_stall = 1e-5
  c.optim.check_every = 25
  c.optim.ladder_start = 1.0
  c.optim.ladder_factor = 10.0
  c.optim.settle_tol = 1e-5
  c.optim.power_iters = 30    # power iterations for the curvature L.
  # Scale (balance/stream.py): the dual is solved on a uniform sample of sample_size rows, then
  # polished by the exact phase again (at most polish_steps steps, same criterion) on a uniform
  # sample of polish_size rows that contains it (all rows when N is smaller: then the polish is
  # exact; for N <= sample_size the solve is). q, the budget and the card are exact passes over
  # all rows in chunks of chunk_size.
  c.optim.sample_size = 1 << 16
  c.optim.polish_size = 1 << 19
  c.optim.polish_steps = 1000
  c.optim.chunk_size = 1 << 14
  # Exact phases (refinement, polish) run on distinct rows weighted by their counts (merge.py):
  # the same sums, far fewer rows for binary annotations.
  c.optim.merge_identical = True
  # The solver's rows are cut into `blocks` blocks; every mini-batch takes the same number of
  # rows from each, and the blocks are spread over gcd(blocks, devices) devices (dual.py), so
  # the result does not depend on the device or process count.
  c.optim.blocks = 8
  # False: s, known, y and w must be exactly 0 or 1 (SPEC §1: membership, knowledge, labels
  # and proxies are multi-hot). True: values in [0, 1] are read as probabilities (e.g. a
  # zero-shot classifier's posterior that an example shows group k). Every constraint is
  # linear in each of s, known, y, w, so M4 then meets the expected moments
  # E[q (s − π) known y] over independent per-example draws of the memberships, i.e. the
  # moments of any hard labelling drawn from those probabilities, in expectation.
  c.soft_membership = False
  c.repeats = False      # also draw integer repeat counts with E[r] = q / η (same-size data).
  # The `balance` command fails (exit 1, nothing written) when the card's verdict is
  # 'infeasible'; True writes the outputs anyway, with the verdict and binding constraints in
  # the card. The library (`balance`, `balance_stream`) always returns the card.
  c.allow_infeasible = False
  return c


class Examples(NamedTuple):
  """Per-example arrays (float32); the same fields hold one mini-batch."""
  s: Any       # [N, m] groups, multi-hot
  known: Any   # [N, m] attribute known (per group)
  y: Any       # [N, c] labels (c = 0 when labels are off)
  w: Any       # [N, p] proxies (p = 0 when proxies are off)
  u: Any       # [N] utility (zeros when utility is off)


class Consts(NamedTuple):
  """Problem constants; traced, so new targets or tolerances do not recompile."""
  pi: Any       # [m]
  eta: Any      # []
  eps: Any      # constraint tree
  precond: Any  # constraint tree: 1 / E[b_j²] (0 for a constraint no example touches)
  cap: Any      # [] the dual cap V


class DualState(NamedTuple):
  """Stochastic-phase state: iterate, running tail average, counters."""
  v: Any        # constraint tree, leading axis 2 (upper, lower)
  mu: Any       # []
  v_avg: Any
  mu_avg: Any
  step: Any     # [] int32
  n_avg: Any    # [] int32, iterates averaged so far


@dataclasses.dataclass(frozen=True)
class M4Result:
  """What `balance` returns."""
  q: np.ndarray     # float32 [N] keep probabilities
  keep: np.ndarray  # bool [N], Bernoulli(q) drawn from the key given to `balance`
  duals: dict       # {'v': constraint tree, each [2, ...] (upper, lower), 'mu': float}
  card: dict        # JSON-serialisable data card (card.py)
  repeats: np.ndarray | None = None  # int32 [N], E[r] = q / η, when config.repeats
  rows: np.ndarray | None = None  # global row indices of q / keep / repeats (None: all rows)


# ---------------------------------------------------------------------------------- math

def bias_vectors(s, known, y, w, pi) -> dict:
  """b per example: {'rep': [N, m], 'assoc': [N, m, c], 'proxy': [N, m, p]}.

  The reference definition, O(N·m·(c + p)) memory, for tests and small data; the solver uses
  the factored `b_dot` and `moment_sums` instead.
  """
  d = (s - pi) * known
  return dict(rep=d, assoc=d[:, :, None] * y[:, None, :], proxy=d[:, :, None] * w[:, None, :])


def b_dot(lam: dict, d, y, w):
  """bᵀλ per example without forming b: [B]. lam: constraint tree; d [B, m]."""
  # Σ_k d_k (λ_rep_k + Σ_r y_r λ_assoc_kr + Σ_j w_j λ_proxy_kj): the duals are summed per
  # group before meeting d, so capped duals of opposite signs (±V) cancel exactly instead of
  # leaving two float32 roundings of V·d (~3e-5 at V = 10³) in q. [B, c] @ [c, m] first: the
  # [B, c] product d @ λ would cost a pass over a [B, c] temporary.
  return jnp.sum(d * (lam["rep"] + y @ lam["assoc"].T + w @ lam["proxy"].T), axis=-1)


def moment_sums(q, d, y, w) -> dict:
  """Σ_i q_i b_i without forming b: constraint tree. q [B], d [B, m]."""
  qd = q[:, None] * d
  return dict(rep=jnp.sum(qd, axis=0), assoc=qd.T @ y, proxy=qd.T @ w)


def primal_q(lam, mu, ex: Examples, pi, eta):
  """q [B] for signed duals λ (constraint tree), and d [B, m] for reuse."""
  d = (ex.s - pi) * ex.known
  return jnp.clip(eta + ex.u - mu - b_dot(lam, d, ex.y, ex.w), 0.0, 1.0), d


def q_from_duals(duals: dict, ex: Examples, pi, eta):
  """Per-example minimiser of the Lagrangian, clip(η + u − µ − vᵀa, 0, 1): [B].

  duals: {'v': constraint tree with leading axis 2, 'mu': []} (as in `M4Result.duals`).
  """
  lam = jax.tree.map(lambda v: v[0] - v[1], duals["v"])
  return primal_q(lam, duals["mu"], ex, pi, eta)[0]


def constraint_moments(q, ann: dict, pi) -> dict:
  """E[q·b] over all N examples for every label and proxy in `ann` (float64 numpy).

  q [N]; ann as in docs/ARCHITECTURE.md (y, w optional); pi [m]. Returns a constraint tree.
  """
  s = np.asarray(ann["s"], np.float64)
  known = np.asarray(ann["known"], np.float64)
  known = known[:, None] if known.ndim == 1 else known
  empty = np.zeros((len(s), 0))
  qd = np.asarray(q, np.float64)[:, None] * (s - np.asarray(pi, np.float64)) * known / len(s)
  return dict(rep=qd.sum(0), assoc=qd.T @ np.asarray(ann.get("y", empty), np.float64),
              proxy=qd.T @ np.asarray(ann.get("w", empty), np.float64))


# --------------------------------------------------------------------------------- set-up

def prepare(ann: dict, config) -> Examples:
  """Validates an annotations dict (`inputs.check_arrays`: shapes, dtypes, values of every
  given field) against config's switches: float32 numpy `Examples`.

  `known` [N] is broadcast to [N, m]; switched-off labels / proxies become [N, 0], u zeros.
  """
  if "s" not in ann or "known" not in ann:
    raise ValueError("annotations need 's' [N, m] and 'known' [N] (docs/ARCHITECTURE.md).")
  inputs.check_arrays(ann, config)
  s = np.asarray(ann["s"], np.float32)
  n, m = s.shape

  def field(name, on, matrix):
    if not on:
      return np.zeros((n, 0) if matrix else (n,), np.float32)
    if name not in ann:
      raise ValueError(f"annotations lack {name!r}, needed by the config (use_labels, "
                       "use_proxies, use_utility); add it or switch that option off.")
    return np.asarray(ann[name], np.float32)

  known = np.asarray(ann["known"], np.float32)
  known = np.broadcast_to(known.reshape(n, -1), (n, m)).copy()
  return Examples(s, known, field("y", config.use_labels, True),
                  field("w", config.use_proxies, True), field("u", config.use_utility, False))


def check_config(config) -> None:
  """Raises ValueError naming the first out-of-range M4 setting (messages name the field as
  `balance.<field>`, its place in the experiment config)."""
  if not 0.0 < config.eta <= 1.0:
    raise ValueError(f"balance.eta={config.eta} is the budget E[q], the expected kept "
                     "fraction, so it must be in (0, 1]; e.g. --config.balance.eta=0.65 keeps "
                     "65 % of the data.")
  if config.pi is not None:
    pi = np.asarray(config.pi, np.float64).reshape(-1)
    if pi.size == 0 or not np.all(np.isfinite(pi) & (pi >= 0) & (pi <= 1)):
      raise ValueError(f"balance.pi={config.pi} must list one target prevalence in [0, 1] per "
                       "group (e.g. (0.5, 0.5) for two groups), or be None to keep each "
                       "group's current prevalence.")
  for name in ("eps_rep", "eps_assoc", "tol"):
    if not config[name] >= 0.0:
      raise ValueError(f"balance.{name} must be >= 0, got {config[name]}.")
  for name in ("tolerance", "tolerance_proxy"):
    value = config.get(name)
    if value not in ("absolute", "relative") and not (name == "tolerance_proxy" and value is None):
      raise ValueError(f"config.{name} must be 'absolute' or 'relative', got {value!r}.")
  if config.get("eps_proxy") is not None and not config.eps_proxy >= 0.0:
    raise ValueError(f"config.eps_proxy must be >= 0 (or None: eps_assoc), got {config.eps_proxy}.")
  if not config.V > 0.0:
    raise ValueError(f"config.V (the dual cap) must be > 0, got {config.V}.")
  o = config.optim
  if o.polish_size < o.sample_size:
    raise ValueError(f"config.optim.polish_size={o.polish_size} must be >= sample_size="
                     f"{o.sample_size}: the solve sample is drawn from the polish sample.")
  if not o.steps >= 0:
    raise ValueError(f"config.optim.steps must be >= 0 (0: no stochastic phase, e.g. when "
                     f"warm-starting), got {o.steps}.")
  for name in ("batch_size", "power_iters", "sample_size", "polish_size", "chunk_size",
               "blocks"):
    if not o[name] >= 1:
      raise ValueError(f"config.optim.{name} must be >= 1, got {o[name]}.")
  if not (o.lr > 0 and o.decay_steps > 0 and o.refine_steps >= 0 and o.polish_steps >= 0
          and 0 <= o.average_from < 1 and o.get("kkt_tol", 0) >= 0
          and o.get("kkt_stall", 0) >= 0
          and o.get("check_every", 1) >= 1 and o.get("ladder_start", 0) >= 0
          and o.get("ladder_factor", 2) > 1):
    raise ValueError("config.optim needs lr > 0, decay_steps > 0, refine_steps >= 0, "
                     "polish_steps >= 0, 0 <= average_from < 1, kkt_tol >= 0, check_every >= 1, "
                     "ladder_start >= 0 and ladder_factor > 1; got "
                     f"{o.lr}, {o.decay_steps}, {o.refine_steps}, {o.polish_steps}, "
                     f"{o.average_from}, {o.get('kkt_tol')}, {o.get('check_every')}, "
                     f"{o.get('ladder_start')}, {o.get('ladder_factor')}.")


def totals(ex: Examples) -> dict:
  """The float64 sums `targets` and `tolerances` need, over in-memory Examples."""
  f64 = lambda x: np.asarray(x, np.float64)
  known = np.broadcast_to(f64(ex.known), ex.s.shape)
  return dict(n=float(len(ex.s)), known=known.sum(0), s_known=(f64(ex.s) * known).sum(0),
              y=f64(ex.y).sum(0), w=f64(ex.w).sum(0))


def targets(config, totals: dict) -> np.ndarray:
  """π [m]: config.pi, or each group's prevalence among rows whose attribute is known."""
  m = totals["known"].shape[0]
  if config.pi is None:
    return (totals["s_known"] / np.maximum(totals["known"], 1)).astype(np.float32)
  pi = np.asarray(config.pi, np.float32).reshape(-1)
  if pi.shape != (m,) or not np.all((pi >= 0) & (pi <= 1)):
    raise ValueError(f"balance.pi must be {m} targets in [0, 1], one per group; got "
                     f"{config.pi}.")
  known, s_known = np.asarray(totals["known"], np.float64), np.asarray(totals["s_known"])
  exclusive = known.max() > 0 and np.allclose(known, known[0]) and np.isclose(
      s_known.sum(), known[0], rtol=1e-6)
  if exclusive:
    # Every known row is in exactly one group, so Σ_k E[q (s_k − π_k) known] =
    # (1 − Σπ) E[q known], and E[q known] >= η − P(unknown). Beyond the sum of the m
    # tolerances no q meets every prevalence constraint: say so instead of solving.
    floor = max(0.0, float(config.eta) - (1.0 - known[0] / totals["n"]))
    slack = m * (float(config.eps_rep) + float(config.tol))
    if abs(1.0 - float(pi.sum())) * floor > slack:
      raise ValueError(
          f"balance.pi={tuple(round(float(p), 4) for p in pi)} sums to {pi.sum():.3f}, but "
          "every example whose group is known is in exactly one group, so the kept "
          "prevalences sum to 1 and these targets cannot be met (within eps_rep="
          f"{config.eps_rep}); give targets that sum to 1, e.g. "
          f"{tuple(round(1 / m, 4) for _ in range(m))}.")
  return pi


def tolerances(config, totals: dict) -> dict:
  """ε as a constraint tree (see `default_config` for 'absolute' vs 'relative')."""
  m, n = totals["known"].shape[0], totals["n"]

  def family(col_sums, eps, mode):
    scale = col_sums / n if mode == "relative" else np.ones_like(col_sums)
    return np.tile(eps * scale, (m, 1)).astype(np.float32)

  eps_proxy = config.eps_assoc if config.get("eps_proxy") is None else config.eps_proxy
  mode_proxy = config.get("tolerance_proxy") or config.tolerance
  return dict(rep=np.full((m,), config.eps_rep, np.float32),
              assoc=family(totals["y"], config.eps_assoc, config.tolerance),
              proxy=family(totals["w"], eps_proxy, mode_proxy))


def balance(ann: dict, config, key: jax.Array, *, names: dict | None = None) -> M4Result:
  """Keep probabilities, a Bernoulli(q) keep mask drawn from `key`, duals and a data card.

  ann: annotations (docs/ARCHITECTURE.md): s [N, m], known [N] or [N, m], y [N, c],
  w [N, p], u [N]. config: like `default_config()`. names: optional dict(groups=[m],
  labels=[c], proxies=[p]) for readable constraint names in the card.
  q depends only on (ann, config), so `draws.keep_mask(result.q, other_key)` redraws the
  subset. The same as `stream.balance_stream` on one in-memory shard.
  """
  from siglip_fair.balance import stream  # pylint: disable=g-import-not-at-top
  return stream.balance_stream(ann, config, key, names=names)
