"""M4 over any number of annotation shards in bounded memory (SPEC §2 at web scale).

Passes over the data, each a walk over the shards in fixed-size chunks (`shards.iter_chunks`,
padded to `optim.chunk_size` rows so every jitted chunk function compiles once):
  1. totals: group prevalence among known, label / proxy rates (targets π and relative
     tolerances need them), value checks, and a seeded uniform sample of `optim.polish_size`
     rows chosen by global index (all rows when N is smaller);
  -  in memory (dual.py): the dual is solved on a uniform `optim.sample_size` subset of that
     sample (stochastic ascent, then exact accelerated refinement), then polished by
     `optim.polish_steps` exact accelerated steps on the whole polish sample; the dual has
     m·(1 + c + p) + 1 coordinates, so ~10⁵–10⁶ rows pin it down for any N;
  2. margins η + u − bᵀλ of every row, then µ by bisection so that E[q] = η exactly;
  3. certificate: q, keep draws and the data card's sums, exact over all N.
The sample, the keep draws and every sum depend on global row indices only, so cutting the
data into a different number of shards gives the same result up to float reduction order.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from siglip_fair.balance import card as cardlib
from siglip_fair.balance import dual, inputs, m4
from siglip_fair.balance.draws import keep_mask, repeat_counts
from siglip_fair.balance.shards import as_shards, iter_chunks



def sample_indices(n: int, size: int, seed: int) -> np.ndarray | None:
  """Sorted global indices of a uniform sample without replacement; None means all rows."""
  if n <= size:
    return None
  return np.sort(np.random.default_rng([seed, n]).choice(n, size, replace=False))


def _pad(arrays: dict, chunk: int, config) -> tuple[m4.Examples, np.ndarray]:
  """Host chunk -> fixed-size Examples (dtypes kept; cast on the device) and mask [chunk].

  Shapes were checked by `_walk`. Every given field is kept, used or not, so the totals pass
  checks its values (a NaN in an unused utility is refused too); `solver_view` drops what the
  config switches off.
  """
  n = len(arrays["s"])

  def get(name, on, shape):
    if name in arrays:  # labels / proxies that are off still go into the card, unconstrained
      return np.asarray(arrays[name])
    if on:
      raise ValueError(f"annotations lack {name!r}, needed by the config (use_labels, "
                       "use_proxies, use_utility); add it or switch that option off.")
    return np.zeros((n,) + shape, np.uint8)

  if "known" not in arrays:
    raise ValueError("annotations need 'known' [N] or [N, m] (docs/ARCHITECTURE.md).")
  known = np.asarray(arrays["known"])
  if known.ndim == 1:
    known = known[:, None]
  fields = [np.asarray(arrays["s"]), known, get("y", config.use_labels, (0,)),
            get("w", config.use_proxies, (0,)), get("u", config.use_utility, ())]
  pad = chunk - n
  fields = [np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x for x in fields]
  mask = np.zeros(chunk, np.float32)
  mask[:n] = 1.0
  return m4.Examples(*fields), mask


def solver_view(ex: m4.Examples, config) -> m4.Examples:
  """The columns M4 constrains: labels / proxies that are switched off become [n, 0], and the
  utility zeros when use_utility is off."""
  return ex._replace(y=ex.y if config.use_labels else ex.y[:, :0],
                     w=ex.w if config.use_proxies else ex.w[:, :0],
                     # zeros of u's own dtype: switching utility off compiles nothing anew
                     u=ex.u if config.use_utility else np.zeros_like(ex.u))


def _f32(ex: m4.Examples) -> m4.Examples:
  s = ex.s.astype(jnp.float32)
  known = jnp.broadcast_to(ex.known.astype(jnp.float32), s.shape)
  return m4.Examples(s, known, ex.y.astype(jnp.float32), ex.w.astype(jnp.float32),
                     ex.u.astype(jnp.float32))


@jax.jit
def _totals(ex: m4.Examples, mask):
  """Chunk sums for targets / tolerances, and value checks (min, max, non-finite count, count
  strictly between 0 and 1) of every field, as `inputs.value_summary` over the real rows.

  Padding rows are zeros, so column sums need no mask; integer fields (multi-hot uint8) are
  checked in their own dtype, which saves a float copy of the widest arrays.
  """
  s = ex.s.astype(jnp.float32)
  known = jnp.broadcast_to(ex.known.astype(jnp.float32), s.shape)
  colsum = lambda x: jnp.sum(x, axis=0, dtype=jnp.float32)
  sums = dict(n=mask.sum(), known=colsum(known), s_known=colsum(s * known), y=colsum(ex.y),
              w=colsum(ex.w))
  checks = {}
  valid = mask > 0
  for name, x in zip(m4.Examples._fields, ex):
    x = x.reshape(x.shape[0], -1)
    if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
      x = x.astype(jnp.int32) if x.dtype == jnp.bool_ else x
      lo = jnp.min(x, initial=0) if jnp.issubdtype(x.dtype, jnp.signedinteger) else 0
      checks[name] = (jnp.asarray(lo, jnp.float32), jnp.max(x, initial=0).astype(jnp.float32),
                      jnp.int32(0), jnp.int32(0))
    else:
      v = valid[:, None]
      finite = v & jnp.isfinite(x)
      checks[name] = (jnp.min(jnp.where(finite, x, jnp.inf), initial=jnp.inf),
                      jnp.max(jnp.where(finite, x, -jnp.inf), initial=-jnp.inf),
                      jnp.sum(v & ~jnp.isfinite(x)), jnp.sum(finite & (x > 0) & (x < 1)))
  return sums, checks


class Plan:
  """Which shards this process reads: shard i belongs to process i % P, and each shard's
  global row offset comes from every shard's length (headers only), so every process numbers
  rows the same way."""

  def __init__(self, shards):
    self.shards = list(shards)
    lengths = [len(s) for s in self.shards]
    self.n = int(sum(lengths))
    self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    p, count = jax.process_index(), jax.process_count()
    if len(self.shards) < count:
      raise ValueError(f"{len(self.shards)} annotation shard(s) for {count} processes: every "
                       "process reads whole shards, so write at least one per process.")
    self.local = [i for i in range(len(self.shards)) if i % count == p]
    self.everything = count == 1
    # Shapes up front from what the shards know without reading (arrays, .npz headers); the
    # others (parquet, records) are checked chunk by chunk as they are read (`check`).
    self.dims, self.fields = None, None
    for i, shard in enumerate(self.shards):
      specs = getattr(shard, "specs", None)
      if specs is not None:
        self.check(i, specs)

  def where(self, i: int) -> str:
    """How messages name shard i."""
    path = getattr(self.shards[i], "path", None)
    if path is not None:
      return f"annotation shard {path!r}: "
    return "annotations: " if len(self.shards) == 1 else f"annotation shard {i}: "

  def check(self, i: int, specs: dict) -> None:
    """Shard i's fields {name: (shape, dtype)} against each other and against the shards
    checked before it (same fields, same m, c, p)."""
    where = self.where(i)
    fix = "rewrite the shard with balance.write_shards" if hasattr(self.shards[i], "path") \
        else None
    dims = inputs.check_shapes(specs, where=where, fix=fix, dims=self.dims)
    fields = {k for k in specs if k in inputs.FIELDS}
    if self.fields is not None and fields != self.fields:
      raise ValueError(f"{where}has fields {sorted(fields)} but an earlier shard has "
                       f"{sorted(self.fields)}; every shard needs the same fields.")
    self.dims, self.fields = inputs.merge_dims(self.dims, dims), fields

  def rows(self) -> np.ndarray | None:
    """Global indices of this process's rows, in its reading order (None: all rows)."""
    if self.everything:
      return None
    return np.concatenate([np.arange(self.offsets[i], self.offsets[i] + len(self.shards[i]))
                           for i in self.local] or [np.zeros(0, np.int64)])


def _walk(plan: Plan, chunk, config, desc, progress):
  """(global offset, local offset, rows, padded Examples, mask) over this process's shards."""
  total = sum(len(plan.shards[i]) for i in plan.local)
  bar = tqdm.tqdm(total=total, desc=desc, unit="ex", unit_scale=True,
                  disable=not progress, dynamic_ncols=True)
  local = 0
  with bar:
    for i in plan.local:
      checked = getattr(plan.shards[i], "specs", None) is not None
      for offset, arrays in iter_chunks([plan.shards[i]], chunk):
        if not checked:
          plan.check(i, {k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()})
        rows = len(arrays["s"])
        ex, mask = _pad(arrays, chunk, config)
        yield int(plan.offsets[i]) + offset, local, rows, ex, mask
        local += rows
        bar.update(rows)


def _allsum(tree):
  """Σ over processes of a tree of float64 numpy arrays (identity for one process).

  Sent as float32 hi + lo parts, since collectives run in float32 without jax_enable_x64;
  the sum keeps ~48 bits."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  hi = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  lo = jax.tree.map(lambda x, h: np.asarray(np.asarray(x, np.float64) - h, np.float32), tree, hi)
  gathered = multihost_utils.process_allgather((hi, lo))
  return jax.tree.map(lambda h, l: h.astype(np.float64).sum(0) + l.astype(np.float64).sum(0),
                      *gathered)


def _add(acc, x):
  x = jax.tree.map(lambda a: np.asarray(a, np.float64), x)
  return x if acc is None else jax.tree.map(np.add, acc, x)


def totals_pass(plan: Plan, config, chunk, idx, progress=False):
  """Pass 1: float64 totals and the sample rows (numpy Examples in the shards' dtypes: uint8
  multi-hot stays 4x smaller than float32), both over all processes (each process reads its
  shards; sample rows are gathered in global order)."""
  acc, parts, index = None, [], []
  soft = bool(config.get("soft_membership", False))

  def dispatched():
    for offset, _, rows, ex, mask in _walk(plan, chunk, config, "M4 totals", progress):
      take = (np.arange(rows) if idx is None else
              idx[np.searchsorted(idx, offset):np.searchsorted(idx, offset + rows)] - offset)
      parts.append(jax.tree.map(lambda x: _take(x, take), solver_view(ex, config)))
      index.append(offset + take)
      yield _totals(ex, mask), offset

  for (sums, checks), offset in _overlapped(dispatched()):
    shard = int(np.searchsorted(plan.offsets, offset, side="right")) - 1
    for name, (lo, hi, bad, frac) in checks.items():
      if lo > hi:  # no finite value in this chunk's field (empty, or all non-finite)
        lo = hi = 0.0
      inputs.check_values(name, float(lo), float(hi), int(bad), int(frac),
                          f"shard {shard}, rows from {offset}", soft)
    acc = _add(acc, sums)
  sample = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
  m = sample.s.shape[1]
  sample = sample._replace(known=np.broadcast_to(sample.known, (len(sample.s), m)).copy())
  return _allsum(acc), _gather_rows(sample, np.concatenate(index))


def _overlapped(results):
  """(host value, tag) for each (device value, tag), fetched one step late: the next chunk is
  read and dispatched while the device still works on this one."""
  pending = None
  for item in results:
    if pending is not None:
      yield jax.device_get(pending[0]), pending[1]
    pending = item
  if pending is not None:
    yield jax.device_get(pending[0]), pending[1]


def _take(x, index):
  return np.take(x, index, axis=0)  # 2-D fancy indexing is several times slower in numpy


def _gather_rows(sample: m4.Examples, index) -> m4.Examples:
  """Every process's sample rows, sorted by global index (identity for one process)."""
  if jax.process_count() == 1:
    return sample
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # One dtype everywhere: processes whose shards differ in dtype must gather alike.
  sample = jax.tree.map(lambda x: np.asarray(x, np.float32), sample)
  counts = multihost_utils.process_allgather(np.int32(len(index)))
  size = int(np.max(counts))
  pad = lambda x: np.pad(x, [(0, size - len(x))] + [(0, 0)] * (x.ndim - 1))
  rows, ids = multihost_utils.process_allgather((jax.tree.map(pad, sample), pad(index)))
  keep = np.concatenate([np.arange(c) + i * size for i, c in enumerate(counts)])
  # The row count spelt out: -1 is ambiguous for a zero-width field (no proxies: w [n, 0]).
  flat = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])[keep]
  order = np.argsort(flat(ids), kind="stable")
  return jax.tree.map(lambda x: flat(x)[order], rows)


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


def margins_pass(plan: Plan, config, chunk, lam, pi, progress=False) -> np.ndarray:
  """η + u − bᵀλ of this process's rows [n_local]."""
  lam = jax.tree.map(jnp.asarray, lam)
  eta = jnp.float32(config.eta)
  dispatched = ((_margins(lam, solver_view(ex, config), pi, eta), rows)
                for _, _, rows, ex, _ in _walk(plan, chunk, config, "M4 margins", progress))
  return np.concatenate([z[:rows] for z, rows in _overlapped(dispatched)])


@jax.jit
def _clipped_sum(z, mu):
  return jnp.sum(jnp.clip(z - mu, 0.0, 1.0))


def budget_shift_distributed(z_local, eta: float, n: int):
  """`budget_shift` when each process holds some of the margins: the same bisection, with
  one cross-process sum per halving. Returns (q_local, µ)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  z = jnp.asarray(z_local)
  lows, highs = multihost_utils.process_allgather(
      (jnp.min(z, initial=np.inf), jnp.max(z, initial=-np.inf)))
  lo, hi = float(np.min(lows)) - 1.0, float(np.max(highs))
  for _ in range(64):  # as budget_shift: E[q](µ) is continuous and non-increasing
    mid = 0.5 * (lo + hi)
    above = _allsum(np.float64(_clipped_sum(z, jnp.float32(mid)))) / n > eta
    lo, hi = (mid, hi) if above else (lo, mid)
  mu = np.float32(0.5 * (lo + hi))
  return np.asarray(jnp.clip(z - mu, 0.0, 1.0)), float(mu)


_PIECE = 4096  # rows per step within a chunk (see _pieces)


def _pieces(tree):
  """A chunk's arrays [B, ...] as [B / _PIECE, _PIECE, ...] for a `lax.scan` over pieces
  ([1, B, ...] when B is not a multiple of _PIECE): on CPU a piece's float temporaries stay in
  cache, where a whole chunk's are fresh memory on every call (the card's sums: ~1.7x)."""
  b = jax.tree.leaves(tree)[0].shape[0]
  k = b // _PIECE if b % _PIECE == 0 else 1
  return jax.tree.map(lambda x: x.reshape((k, b // k) + x.shape[1:]), tree)


@jax.jit
def _card_sums(ex: m4.Examples, q, keep, mask):
  """`card.card_sums` of one padded chunk (summed over its pieces)."""
  pieces = _pieces((ex, q, keep, mask))
  first = jax.eval_shape(_card_piece, *jax.tree.map(lambda x: x[0], pieces))
  add = lambda acc, x: (jax.tree.map(jnp.add, acc, _card_piece(*x)), None)
  return jax.lax.scan(add, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first),
                      pieces)[0]


def _card_piece(ex: m4.Examples, q, keep, mask):
  """The card's sums of some rows, as one [6m, B] @ [B, 1 + c + p] product (six thin products
  per weight were most of the pass)."""
  f = _f32(ex)
  m, c = f.s.shape[1], f.y.shape[1]
  k = jnp.stack([mask, q * mask, keep * mask])[:, None, :] * f.known.T  # [3, m, B]
  rows = jnp.concatenate([k, k * f.s.T], axis=1).reshape(6 * m, -1)  # known_k, s_k·known_k
  cols = jnp.concatenate([mask[:, None], f.y, f.w], axis=1)  # padding rows have k = 0 anyway
  # [6m, B] @ [B, 1 + c + p]: XLA's CPU dot is ~4x slower with the batch axis elsewhere.
  prod = (rows @ cols).reshape(3, 2 * m, -1)
  out = {}
  for i, name in enumerate(("one", "q", "keep")):
    kk, ss = prod[i, :m], prod[i, m:]
    out[name] = dict(known=kk[:, 0], s_known=ss[:, 0], known_y=kk[:, 1:1 + c],
                     s_y=ss[:, 1:1 + c], known_w=kk[:, 1 + c:], s_w=ss[:, 1 + c:])
  out["q_sum"], out["q_sq"], out["keep_sum"] = (q * mask).sum(), (q * q * mask).sum(), (
      keep * mask).sum()
  out["n"], out["uq"] = mask.sum(), (f.u * q * mask).sum()
  return out


def card_pass(plan: Plan, config, chunk, q, keep, progress=False) -> dict:
  """Pass 3: the data card's float64 sums (`card.card_sums`) over all processes' rows.

  q, keep: this process's rows, in its reading order."""
  def dispatched():
    for _, local, rows, ex, mask in _walk(plan, chunk, config, "M4 card", progress):
      pad = lambda x: np.pad(np.asarray(x[local:local + rows], np.float32), (0, chunk - rows))
      # The utility only where M4 used it (the objective f(q) in the card's gap).
      ex = ex._replace(u=solver_view(ex, config).u)
      yield _card_sums(ex, pad(q), pad(keep), mask), None

  acc = None
  for sums, _ in _overlapped(dispatched()):
    acc = _add(acc, sums)
  return _allsum(acc)


def balance_stream(source, config, key: jax.Array, *, names: dict | None = None,
                   init: dict | None = None, progress: bool = False,
                   devices=None) -> m4.M4Result:
  """M4 over annotation shards: keep probabilities, keep mask (and repeat counts), duals, card.

  source: anything `shards.as_shards` takes (an annotation dict, .npz paths, a directory of
  shards, record sources). init: duals of an earlier run ({'v', 'mu'} as in M4Result.duals)
  to warm-start from. devices: the solver's devices (default all, over every process).
  Other arguments as `m4.balance`.

  With several processes (`jax.distributed`), call it on every process with the same
  arguments: process p reads shards p, p + P, ...; the duals and the card are global and
  identical everywhere, while q / keep / repeats hold this process's rows, whose global
  indices are `result.rows`.
  """
  m4.check_config(config)
  plan = Plan(as_shards(source))
  n = plan.n
  if n == 0:
    raise ValueError("the annotation shards hold no examples.")
  o = config.optim
  chunk = int(min(o.chunk_size, n))
  idx = sample_indices(n, o.polish_size, config.seed)
  clock = [time.perf_counter()]
  seconds = {}

  def lap(name):
    now = time.perf_counter()
    seconds[name] = seconds.get(name, 0.0) + now - clock[0]
    clock[0] = now

  totals, large = totals_pass(plan, config, chunk, idx, progress)
  lap("totals")
  # The solve sample is a uniform subset of the polish sample (itself all rows or a uniform
  # sample), so it is a uniform sample of the data.
  within = sample_indices(len(large.s), o.sample_size, config.seed + 1)
  sample = large if within is None else jax.tree.map(lambda x: _take(x, within), large)
  pi = m4.targets(config, totals)
  eps = m4.tolerances(config, dict(totals, y=totals["y"][:sample.y.shape[1]],
                                   w=totals["w"][:sample.w.shape[1]]))
  # A sample's exact phase stops at its own noise; the polish (or all rows) goes further.
  solution = dual.solve(sample, pi, eps, config, init=init, devices=devices,
                        sampled=within is not None and bool(o.polish_steps))
  lap("solve")
  info = solution.info
  info.update(sample=int(len(sample.s)), polish_sample=int(len(large.s)), n=n, polish_steps=0)
  if within is not None and o.polish_steps:
    # Duals fitted to a sample also fit its noise, which costs objective on the full data
    # (~1 % at 2^16 rows); the exact phase again on the 8x larger polish sample (all rows up
    # to polish_size), run to the same criterion, removes it.
    solution = dual.polish(large, solution, config, o.polish_steps, devices,
                           sampled=idx is not None)
    lap("polish")
    info = solution.info
  lam = solution.lam
  rows = plan.rows()

  def draws(q):
    if rows is None:
      return keep_mask(q, key)
    return np.concatenate([keep_mask(q[a:b], key, int(plan.offsets[i])) for i, a, b in
                           _local_spans(plan)])

  def certify(lam):
    z = margins_pass(plan, config, chunk, lam, pi, progress)
    if plan.everything:
      q, mu = budget_shift(jnp.asarray(z), jnp.float32(config.eta))
      q, mu = np.asarray(q), float(mu)
    else:
      q, mu = budget_shift_distributed(z, config.eta, n)
    keep = draws(q)
    lap("margins")
    sums = card_pass(plan, config, chunk, q, keep, progress)
    lap("card")
    return q, mu, keep, sums

  q, mu, keep, sums = certify(lam)
  info["seconds"] = seconds
  # The prices at V: the duals q came from, moved along the solution path when the solution
  # settled at a lower cap (convergence.converge; µ keeps the budget shift the bisection made).
  v = jax.tree.map(lambda x: np.stack([np.maximum(x, 0), np.maximum(-x, 0)]).astype(np.float32),
                   jax.tree.map(np.asarray, solution.lam_v))
  duals = dict(v=v, mu=float(mu) + solution.mu_v - solution.mu)
  card = cardlib.data_card_from_sums(sums, pi=pi, eps=eps, duals=duals, config=config,
                                     info=info, names=names)
  repeats = None
  if config.get("repeats", False):
    repeats = (repeat_counts(q, config.eta, key) if rows is None else np.concatenate(
        [repeat_counts(q[a:b], config.eta, key, int(plan.offsets[i]))
         for i, a, b in _local_spans(plan)]))
  return m4.M4Result(q=q, keep=keep, duals=duals, card=card, repeats=repeats, rows=rows)


def _local_spans(plan: Plan):
  """(shard id, start, stop) of each local shard within this process's concatenated rows."""
  spans, start = [], 0
  for i in plan.local:
    spans.append((i, start, start + len(plan.shards[i])))
    start += len(plan.shards[i])
  return spans
