"""M4 over any number of annotation shards in bounded memory (SPEC §2 at web scale).

Passes over the data, each a walk over the shards in fixed-size chunks (`shards.iter_chunks`,
padded to `optim.chunk_size` rows so every jitted chunk function compiles once):
  1. totals: group prevalence among known, label / proxy rates (targets π and relative
     tolerances need them), value checks, and a seeded uniform sample of `optim.sample_size`
     rows chosen by global index (all rows when N is smaller);
  -  the dual is solved on the sample in memory (`m4.solve`: stochastic ascent, then exact
     accelerated refinement); the dual has m·(1 + c + p) + 1 coordinates, so a sample of
     ~10⁵ rows pins it down for any N;
  2. margins η + u − bᵀλ of every row, then µ by bisection so that E[q] = η exactly;
  3. certificate: q, keep draws and the data card's sums, exact over all N;
  +  optional polish: `optim.polish_steps` exact accelerated steps on the full data (each one
     pass) when the certificate of a sampled solve shows a violation, then 2–3 again.
The sample, the keep draws and every sum depend on global row indices only, so cutting the
data into a different number of shards gives the same result up to float reduction order.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from siglip_fair.balance import card as cardlib
from siglip_fair.balance import m4
from siglip_fair.balance.shards import as_shards, iter_chunks

_BLOCK = 1 << 16  # keep / repeat draws: one PRNG key per block of global row indices


def sample_indices(n: int, size: int, seed: int) -> np.ndarray | None:
  """Sorted global indices of a uniform sample without replacement; None means all rows."""
  if n <= size:
    return None
  return np.sort(np.random.default_rng([seed, n]).choice(n, size, replace=False))


def _pad(arrays: dict, chunk: int, config) -> tuple[m4.Examples, np.ndarray]:
  """Host chunk -> fixed-size Examples (dtypes kept; cast on the device) and mask [chunk]."""
  n = len(arrays["s"])
  m = arrays["s"].shape[1]

  def get(name, on, shape):
    if name in arrays:  # labels / proxies that are off still go into the card, unconstrained
      return np.asarray(arrays[name])
    if on:
      raise ValueError(f"annotations lack {name!r}, needed by the config (use_labels, "
                       "use_proxies, use_utility); add it or switch that option off.")
    return np.zeros((n,) + shape, np.uint8)

  known = np.asarray(arrays["known"]) if "known" in arrays else None
  if known is None:
    raise ValueError("annotations need 'known' [N] or [N, m] (docs/ARCHITECTURE.md).")
  if known.ndim not in (1, 2) or (known.ndim == 2 and known.shape[1] != m):
    raise ValueError(f"annotations['known'] must be [N] or [N, {m}], got {known.shape}.")
  if known.ndim == 1:
    known = known[:, None]
  u = get("u", config.use_utility, ()) if config.use_utility else np.zeros(n, np.uint8)
  fields = [np.asarray(arrays["s"]), known, get("y", config.use_labels, (0,)),
            get("w", config.use_proxies, (0,)), u]
  for name, x in zip(("s", "known", "y", "w", "u"), fields):
    if len(x) != n:
      raise ValueError(f"annotations[{name!r}] has {len(x)} rows but 's' has {n}.")
  pad = chunk - n
  fields = [np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x for x in fields]
  mask = np.zeros(chunk, np.float32)
  mask[:n] = 1.0
  return m4.Examples(*fields), mask


def solver_view(ex: m4.Examples, config) -> m4.Examples:
  """The columns M4 constrains: labels / proxies that are switched off become [n, 0]."""
  return ex._replace(y=ex.y if config.use_labels else ex.y[:, :0],
                     w=ex.w if config.use_proxies else ex.w[:, :0])


def _f32(ex: m4.Examples) -> m4.Examples:
  s = ex.s.astype(jnp.float32)
  known = jnp.broadcast_to(ex.known.astype(jnp.float32), s.shape)
  return m4.Examples(s, known, ex.y.astype(jnp.float32), ex.w.astype(jnp.float32),
                     ex.u.astype(jnp.float32))


@jax.jit
def _totals(ex: m4.Examples, mask):
  """Chunk sums for targets / tolerances and value checks (min, max, non-finite count)."""
  f = _f32(ex)
  mk = f.known * mask[:, None]
  sums = dict(n=mask.sum(), known=mk.sum(0), s_known=(f.s * mk).sum(0),
              y=mask @ f.y, w=mask @ f.w)
  checks = {}
  for name, x in zip(m4.Examples._fields, f):
    x = x.reshape(x.shape[0], -1)
    valid = mask[:, None] > 0
    checks[name] = (jnp.min(jnp.where(valid, x, jnp.inf), initial=jnp.inf),
                    jnp.max(jnp.where(valid, x, -jnp.inf), initial=-jnp.inf),
                    jnp.sum(valid & ~jnp.isfinite(x)))
  return sums, checks


def _check(name, lo, hi, bad, where):
  if bad:
    raise ValueError(f"annotations[{name!r}] has {int(bad)} non-finite values ({where}).")
  if name != "u" and (lo < 0 or hi > 1):
    raise ValueError(f"annotations[{name!r}] must lie in [0, 1] (multi-hot), got values in "
                     f"[{lo}, {hi}] ({where}).")


def _walk(shards, chunk, config, desc, progress):
  """(global offset, number of rows, padded Examples, mask) over all shards."""
  bar = tqdm.tqdm(total=sum(len(s) for s in shards), desc=desc, unit="ex", unit_scale=True,
                  disable=not progress, dynamic_ncols=True)
  with bar:
    for offset, arrays in iter_chunks(shards, chunk):
      rows = len(arrays["s"])
      ex, mask = _pad(arrays, chunk, config)
      yield offset, rows, ex, mask
      bar.update(rows)


def _add(acc, x):
  x = jax.tree.map(lambda a: np.asarray(a, np.float64), x)
  return x if acc is None else jax.tree.map(np.add, acc, x)


def totals_pass(shards, config, chunk, idx, progress=False):
  """Pass 1: float64 totals and the sample rows (numpy Examples, float32)."""
  acc, parts, shard_ends = None, [], np.cumsum([len(s) for s in shards])
  for offset, rows, ex, mask in _walk(shards, chunk, config, "M4 totals", progress):
    sums, checks = jax.device_get(_totals(ex, mask))
    shard = int(np.searchsorted(shard_ends, offset, side="right"))
    for name, (lo, hi, bad) in checks.items():
      _check(name, float(lo), float(hi), int(bad), f"shard {shard}, rows from {offset}")
    acc = _add(acc, sums)
    take = (np.arange(rows) if idx is None else
            idx[np.searchsorted(idx, offset):np.searchsorted(idx, offset + rows)] - offset)
    parts.append(jax.tree.map(lambda x: np.asarray(x[take], np.float32),
                              solver_view(ex, config)))
  sample = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
  m = sample.s.shape[1]
  sample = sample._replace(known=np.broadcast_to(sample.known, (len(sample.s), m)).copy())
  return acc, sample


@jax.jit
def _margins(lam, ex: m4.Examples, pi, eta):
  f = _f32(ex)
  d = (f.s - pi) * f.known
  return eta + f.u - m4.b_dot(lam, d, f.y, f.w)


@jax.jit
def budget_shift(z, eta):
  """µ by bisection so that mean(clip(z − µ, 0, 1)) = η; returns (q [N], µ)."""
  mean_q = lambda mu: jnp.mean(jnp.clip(z - mu, 0.0, 1.0))

  def bisect(_, bounds):  # E[q](µ) is continuous and non-increasing
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = mean_q(mid) > eta
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  # At µ = min z − 1 every q is 1, at µ = max z every q is 0; 64 halvings reach float32 ulp.
  lo, hi = jax.lax.fori_loop(0, 64, bisect, (jnp.min(z) - 1.0, jnp.max(z)))
  mu = 0.5 * (lo + hi)
  return jnp.clip(z - mu, 0.0, 1.0), mu


def margins_pass(shards, config, chunk, lam, pi, progress=False) -> np.ndarray:
  lam = jax.tree.map(jnp.asarray, lam)
  out = []
  for _, rows, ex, _ in _walk(shards, chunk, config, "M4 margins", progress):
    out.append(np.asarray(_margins(lam, solver_view(ex, config), pi,
                                   jnp.float32(config.eta)))[:rows])
  return np.concatenate(out)


def _blocked_uniforms(key, n):
  """U(0, 1) [n]: row i from block i // 2^16 of its own folded key, so any shard layout draws
  the same number for the same row."""
  nb = -(-n // _BLOCK)
  u = jax.vmap(lambda b: jax.random.uniform(jax.random.fold_in(key, b), (_BLOCK,)))(
      jnp.arange(nb, dtype=jnp.uint32))
  return u.reshape(-1)[:n]


def keep_mask(q, key: jax.Array) -> np.ndarray:
  """Independent Bernoulli(q_i) draws: bool [N]; the same key gives the same mask."""
  q = jnp.asarray(q, jnp.float32)
  return np.asarray(_blocked_uniforms(key, q.shape[0]) < q)


def repeat_counts(q, eta: float, key: jax.Array) -> np.ndarray:
  """Integer copies per row with E[r_i] = q_i / η, so E[Σ r] = N: a balanced dataset the size of
  the baseline (the paper repeats kept examples). int32 [N], stochastic rounding."""
  x = np.asarray(q, np.float64) / eta
  u = np.asarray(_blocked_uniforms(jax.random.fold_in(key, 1), x.shape[0]))
  return (np.floor(x) + (u < x - np.floor(x))).astype(np.int32)


@jax.jit
def _card_sums(ex: m4.Examples, q, keep, mask):
  f = _f32(ex)
  ones = mask
  out = {}
  for name, wt in (("one", ones), ("q", q * mask), ("keep", keep * mask)):
    k = f.known * wt[:, None]
    s = f.s * k
    out[name] = dict(known=k.sum(0), s_known=s.sum(0), known_y=k.T @ f.y, s_y=s.T @ f.y,
                     known_w=k.T @ f.w, s_w=s.T @ f.w)  # as card.card_sums
  out["q_sum"], out["q_sq"], out["keep_sum"] = (q * mask).sum(), (q * q * mask).sum(), (
      keep * mask).sum()
  out["n"] = mask.sum()
  return out


def card_pass(shards, config, chunk, q, keep, progress=False) -> dict:
  """Pass 3: the data card's float64 sums (`card.data_card_from_sums`)."""
  acc = None
  for offset, rows, ex, mask in _walk(shards, chunk, config, "M4 card", progress):
    pad = lambda x: np.pad(np.asarray(x[offset:offset + rows], np.float32), (0, chunk - rows))
    acc = _add(acc, _card_sums(ex, pad(q), pad(keep), mask))
  return acc


def _exact_gradient(shards, config, chunk, lam, mu, pi):
  """Full-data dual gradient (E[q·b], E[q] − η) in one pass."""
  grad_fn = _grad_sums
  acc = None
  for _, _, ex, mask in _walk(shards, chunk, config, "M4 polish", False):
    acc = _add(acc, grad_fn(lam, mu, solver_view(ex, config), mask, pi,
                            jnp.float32(config.eta)))
  n = acc["n"]
  return jax.tree.map(lambda x: x / n, acc["b"]), acc["q"] / n - config.eta


@jax.jit
def _grad_sums(lam, mu, ex, mask, pi, eta):
  f = _f32(ex)
  d = (f.s - pi) * f.known
  q = jnp.clip(eta + f.u - mu - m4.b_dot(lam, d, f.y, f.w), 0.0, 1.0) * mask
  return dict(b=m4.moment_sums(q, d, f.y, f.w), q=q.sum(), n=mask.sum())


def polish(shards, config, chunk, lam, mu, consts: m4.Consts, unit, steps: int):
  """`steps` FISTA steps (as `m4.refine`) with exact full-data gradients, one pass each."""
  x = x_prev = (jax.tree.map(np.asarray, lam), float(mu))
  t = 1.0
  for _ in range(steps):
    t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
    y = jax.tree.map(lambda a, b: a + (t - 1.0) / t_next * (a - b), x, x_prev)
    gl, gmu = _exact_gradient(shards, config, chunk, y[0], y[1], consts.pi)

    def prox(lam, g, eps, p):
      z = lam + unit * np.asarray(p) * g
      z = np.sign(z) * np.maximum(np.abs(z) - unit * np.asarray(p) * np.asarray(eps), 0.0)
      return np.clip(z, -config.V, config.V)

    x_new = (jax.tree.map(prox, y[0], gl, consts.eps, consts.precond), y[1] + unit * gmu)
    back = sum(np.vdot(a - b, a - c) for a, b, c in zip(
        jax.tree.leaves(x_new), jax.tree.leaves(y), jax.tree.leaves(x)))
    x_prev, x, t = x, x_new, (1.0 if back < 0 else t_next)
  return x


def balance_stream(source, config, key: jax.Array, *, names: dict | None = None,
                   init: dict | None = None, progress: bool = False) -> m4.M4Result:
  """M4 over annotation shards: keep probabilities, keep mask (and repeat counts), duals, card.

  source: anything `shards.as_shards` takes (an annotation dict, .npz paths, a directory of
  shards, record sources). init: duals of an earlier run ({'v', 'mu'} as in M4Result.duals)
  to warm-start from. Other arguments as `m4.balance`.
  """
  m4.check_config(config)
  shards = as_shards(source)
  n = sum(len(s) for s in shards)
  if n == 0:
    raise ValueError("the annotation shards hold no examples.")
  o = config.optim
  chunk = int(min(o.chunk_size, n))
  idx = sample_indices(n, o.sample_size, config.seed)
  totals, sample = totals_pass(shards, config, chunk, idx, progress)
  pi = m4.targets(config, totals)
  eps = m4.tolerances(config, dict(totals, y=totals["y"][:sample.y.shape[1]],
                                   w=totals["w"][:sample.w.shape[1]]))
  lam, mu, consts, unit, info = m4.solve(sample, pi, eps, config, init=init)

  def certify(lam):
    z = margins_pass(shards, config, chunk, lam, pi, progress)
    q, mu = budget_shift(jnp.asarray(z), jnp.float32(config.eta))
    q = np.asarray(q)
    keep = keep_mask(q, key)
    sums = card_pass(shards, config, chunk, q, keep, progress)
    return q, float(mu), keep, sums

  q, mu, keep, sums = certify(lam)
  info.update(sample=int(len(sample.s)), n=n, polish_steps=0)
  if idx is not None and o.polish_steps and cardlib.worst_residual(
      sums, pi, eps, config) > config.tol:
    lam, mu = polish(shards, config, chunk, lam, mu, consts, unit, o.polish_steps)
    q, mu, keep, sums = certify(lam)
    info["polish_steps"] = int(o.polish_steps)
  v = jax.tree.map(lambda x: np.stack([np.maximum(x, 0), np.maximum(-x, 0)]).astype(np.float32),
                   jax.tree.map(np.asarray, lam))
  duals = dict(v=v, mu=mu)
  card = cardlib.data_card_from_sums(sums, pi=pi, eps=eps, duals=duals, config=config,
                                     info=info, names=names)
  repeats = repeat_counts(q, config.eta, key) if config.get("repeats", False) else None
  return m4.M4Result(q=q, keep=keep, duals=duals, card=card, repeats=repeats)
