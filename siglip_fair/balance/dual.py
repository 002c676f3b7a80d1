"""The dual ascent of M4, data-parallel over a device mesh (`jax.shard_map`).

The rows M4 solves on (all of the data, or a sample of it, see stream.py) are cut into
`optim.blocks` contiguous blocks, each padded to the same length. Block k lives on device
k // (blocks / D) of a 1-D mesh of D devices (D = gcd(blocks, devices); processes contribute
equally). A mini-batch is `ceil(batch_size / blocks)` rows from every block, so:
  * each device computes moment sums on its own rows and one `psum` per step gives the
    global mean (the SPEC update), and a full pass is a local scan plus one `psum`;
  * the batches do not depend on D: 1, 2, 4 or 8 devices (or processes) follow the same
    trajectory, and results agree up to float reduction order.
Phases (all pure): Jacobi preconditioner P = 1 / E[b²] (one pass), curvature L by power
iteration, stochastic projected ascent with per-block shuffles and tail averaging, then FISTA
refinement on exact gradients (the cap ladder and its KKT criterion: convergence.py). See
m4.py for the math and notation.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from siglip_fair.balance import merge
from siglip_fair.balance.m4 import Consts, DualState, Examples, b_dot, moment_sums, primal_q

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the solver's rows sit on the mesh (hashable: a static argument of the jitted phases)."""
  mesh: jax.sharding.Mesh
  blocks: int  # V
  rows: int    # padded rows per block (a multiple of batch)
  batch: int   # rows per block per step
  n: int       # real rows
  total: int   # examples they stand for (their summed weights; n when unweighted)

  @property
  def steps(self) -> int:
    return self.rows // self.batch


def make_layout(n: int, config, devices=None, total: int | None = None) -> Layout:
  """The block layout for n rows under config.optim (blocks, batch_size) on `devices`;
  total: the examples the rows stand for when they are weighted (`merge.merge_identical`)."""
  o = config.optim
  blocks = int(o.blocks)
  devices = list(devices if devices is not None else jax.devices())
  num = math.gcd(blocks, len(devices))
  procs = sorted({d.process_index for d in devices})
  if num % len(procs):
    raise ValueError(f"M4 uses gcd(optim.blocks={blocks}, {len(devices)} devices) = {num} "
                     f"devices, which {len(procs)} processes cannot share equally; make "
                     "optim.blocks a multiple of the device count.")
  per = num // len(procs)
  chosen = [d for p in procs for d in [x for x in devices if x.process_index == p][:per]]
  mesh = jax.make_mesh((num,), (AXIS,), axis_types=(AxisType.Auto,), devices=chosen)
  batch = max(1, -(-min(o.batch_size, n) // blocks))
  per_block = -(-n // blocks)
  rows = -(-per_block // batch) * batch
  return Layout(mesh, blocks, rows, batch, n, n if total is None else int(total))


def to_blocks(ex: Examples, layout: Layout, weights=None) -> tuple[Examples, jax.Array]:
  """Host Examples [n, ...] -> global arrays [V, rows, ...] sharded over the mesh, and mask
  (1 per real row, or its weight [n]; 0 for padding).

  Every process passes the same host rows; each device receives only its blocks.
  """
  n, v, rows = layout.n, layout.blocks, layout.rows
  per_block = -(-n // v)
  index = np.arange(v)[:, None] * per_block + np.arange(rows)[None, :]
  real = (np.arange(rows)[None, :] < per_block) & (index < n)
  index = np.where(real, index, 0)
  sharding = NamedSharding(layout.mesh, P(AXIS))

  def place(x):
    # np.take: fancy indexing of a 2-D array is several times slower in numpy.
    x = np.asarray(x)
    # uint8 / bool fields (0/1 multi-hot) stay uint8 on the device: 4x less memory per pass.
    dtype = np.uint8 if x.dtype in (np.uint8, np.bool_) else np.float32
    host = np.take(x, index.ravel(), axis=0).astype(dtype)
    host = host.reshape(index.shape + host.shape[1:])
    host[~real] = 0
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  return jax.tree.map(place, ex), place(np.ones(n, np.float32) if weights is None else weights)


def _flat(x):  # [blocks, rows, ...] -> [blocks * rows, ...] (explicit: -1 fails on 0-width)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _varying(tree):
  return jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), tree)


def _sweep(fn, ex: Examples, mask, batch: int, init):
  """Σ over every local row of fn(batch, mask) (sequential mini-batches), then one psum."""
  steps = mask.shape[1] // batch

  def body(acc, t):
    take = lambda x: _flat(jax.lax.dynamic_slice_in_dim(x, t * batch, batch, axis=1))
    return jax.tree.map(jnp.add, acc, fn(jax.tree.map(take, ex), take(mask))), None

  acc = jax.lax.scan(body, _varying(init), jnp.arange(steps))[0]
  return jax.lax.psum(acc, AXIS)


def _zeros(consts: Consts):
  return jax.tree.map(jnp.zeros_like, consts.eps), jnp.float32(0)


def _spec(tree, spec):
  return jax.tree.map(lambda _: spec, tree)


def _run(layout: Layout, fn, sharded, replicated):
  """shard_map fn(sharded..., replicated...) with sharded args split over blocks."""
  specs = tuple(_spec(a, P(AXIS)) for a in sharded) + tuple(_spec(a, P()) for a in replicated)
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=specs, out_specs=P())(*sharded,
                                                                              *replicated)


def dual_step(state: DualState, batch: Examples, mask, consts: Consts, lr, average,
              axis_name: str | None = None) -> DualState:
  """One projected stochastic dual-ascent step on a padded mini-batch; pure.

  v ← clip(v + lr·P·(mean(q·a) − ε), 0, V), µ ← µ + lr·(mean(q) − η), P = 1 / E[a²].
  mask [B]: 1 for real examples, 0 for padding. average (bool []): whether the new iterate
  joins the running average. axis_name: sum the batch over this mesh axis (one psum).
  """
  lam = jax.tree.map(lambda v: v[0] - v[1], state.v)
  q, d = primal_q(lam, state.mu, batch, consts.pi, consts.eta)
  q = q * mask
  sums = (moment_sums(q, d, batch.y, batch.w), jnp.sum(q), jnp.sum(mask))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  moments, total, count = sums
  n = jnp.maximum(count, 1.0)

  def ascend(v, s, eps, p):
    g = s / n
    return jnp.clip(v + lr * p * jnp.stack([g - eps, -g - eps]), 0.0, consts.cap)

  v = jax.tree.map(ascend, state.v, moments, consts.eps, consts.precond)
  mu = state.mu + lr * (total / n - consts.eta)
  n_avg = state.n_avg + average.astype(jnp.int32)
  rate = average / jnp.maximum(n_avg, 1)
  v_avg = jax.tree.map(lambda a, x: a + rate * (x - a), state.v_avg, v)
  return DualState(v, mu, v_avg, state.mu_avg + rate * (mu - state.mu_avg), state.step + 1,
                   n_avg)


@functools.partial(jax.jit, static_argnames=("layout",))
def jacobi(ex: Examples, mask, pi, *, layout: Layout) -> dict:
  """P = 1 / E[b_j²] per constraint (a constraint tree), in one pass.

  A constraint with E[b_j²] = 0 has b_j ≡ 0, so its dual cannot move anyway: P_j = 0.
  """
  def local(ex, mask, pi):
    def fn(batch, m):
      d = (batch.s - pi) * batch.known
      return moment_sums(m, d ** 2, batch.y ** 2, batch.w ** 2)
    m, c, p = ex.s.shape[-1], ex.y.shape[-1], ex.w.shape[-1]
    zeros = dict(rep=jnp.zeros(m), assoc=jnp.zeros((m, c)), proxy=jnp.zeros((m, p)))
    second = _sweep(fn, ex, mask, layout.batch, zeros)
    return jax.tree.map(lambda x: jnp.where(x > 0, layout.total / jnp.where(x > 0, x, 1.0), 0.0),
                        second)
  return _run(layout, local, (ex, mask), (pi,))


@functools.partial(jax.jit, static_argnames=("layout", "iters"))
def curvature(ex: Examples, mask, consts: Consts, *, layout: Layout, iters: int):
  """L = λ_max(P^½ E[ã ãᵀ] P^½), ã = [1; b], by matrix-free power iteration: [].

  Bounds the curvature of the dual in (λ, µ), since clipping q only removes examples from it.
  """
  def local(ex, mask, consts):
    sq = jax.tree.map(jnp.sqrt, consts.precond)

    def gram(x):
      lam = jax.tree.map(jnp.multiply, sq, x[0])
      def fn(batch, m):
        d = (batch.s - consts.pi) * batch.known
        r = (x[1] + b_dot(lam, d, batch.y, batch.w)) * m
        return moment_sums(r, d, batch.y, batch.w), jnp.sum(r)
      g, gmu = _sweep(fn, ex, mask, layout.batch, _zeros(consts))
      return jax.tree.map(lambda a, b: a * b / layout.total, sq, g), gmu / layout.total

    norm = lambda x: jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(x)))
    x = jax.lax.fori_loop(0, iters, lambda _, x: jax.tree.map(lambda a: a / norm(x), gram(x)),
                          (jax.tree.map(jnp.ones_like, consts.eps), jnp.float32(1)))
    return norm(gram(x)) / norm(x)
  return _run(layout, local, (ex, mask), (consts,))


def shuffles(seed: int, epochs: int, layout: Layout) -> jax.Array:
  """Row order of every block in every epoch: [epochs, V, rows] int32, sharded over blocks.

  Drawn on the host, seeded by (seed, epoch) alone, so any device or process count gets the
  same orders; XLA's CPU sort made `jax.random.permutation` most of the stochastic phase.
  """
  base = np.broadcast_to(np.arange(layout.rows, dtype=np.int32), (layout.blocks, layout.rows))
  host = np.stack([np.random.default_rng([seed, e]).permuted(base, axis=1)
                   for e in range(epochs)]) if epochs else np.zeros((0,) + base.shape, np.int32)
  sharding = NamedSharding(layout.mesh, P(None, AXIS))
  return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


@functools.partial(jax.jit, static_argnames=("layout",))
def stochastic_ascent(ex: Examples, mask, consts: Consts, orders, lr, decay_steps, average_from,
                      v0, mu0, *, layout: Layout) -> DualState:
  """The stochastic phase from duals (v0, µ0): one pass per epoch of `orders` ([epochs, V,
  rows], `shuffles`), each block in its own order, tail-averaged; one psum per step."""
  def local(ex, mask, orders, consts, lr, decay_steps, average_from, v0, mu0):
    epochs = orders.shape[0]
    total = epochs * layout.steps
    avg_start = jnp.minimum(jnp.floor(average_from * total), total - 1).astype(jnp.int32)

    def epoch(e, state):
      order = jax.lax.dynamic_index_in_dim(orders, e, keepdims=False)

      def body(st, t):
        idx = jax.lax.dynamic_slice_in_dim(order, t * layout.batch, layout.batch, axis=1)
        take = lambda x: _flat(jnp.take_along_axis(
            x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1))
        lr_t = lr / (1.0 + st.step / decay_steps)
        return dual_step(st, jax.tree.map(take, ex), take(mask), consts, lr_t,
                         st.step >= avg_start, AXIS), None

      return jax.lax.scan(body, state, jnp.arange(layout.steps))[0]

    state = DualState(v0, mu0, v0, mu0, jnp.int32(0), jnp.int32(0))
    return jax.lax.fori_loop(0, epochs, epoch, state)
  specs = (_spec(ex, P(AXIS)), P(AXIS), P(None, AXIS)) + tuple(
      _spec(a, P()) for a in (consts, lr, decay_steps, average_from, v0, mu0))
  return jax.shard_map(local, mesh=layout.mesh, in_specs=specs, out_specs=P())(
      ex, mask, orders, consts, lr, decay_steps, average_from, v0, mu0)


def _full_gradient(lam, mu, ex, mask, consts: Consts, batch: int, n: int):
  """Exact dual gradient in one pass: (E[q·b] constraint tree, E[q] − η)."""
  def fn(b, m):
    q, d = primal_q(lam, mu, b, consts.pi, consts.eta)
    return moment_sums(q * m, d, b.y, b.w), jnp.sum(q * m)
  sums, total = _sweep(fn, ex, mask, batch, _zeros(consts))
  return jax.tree.map(lambda x: x / n, sums), total / n - consts.eta


def fista(grad_fn, lam, mu, consts: Consts, lr, steps: int, traced: bool = True, carry=None):
  """FISTA with gradient restart on the dual in (λ = v⁺ − v⁻, µ); returns (λ, µ), or with
  `carry` (from `fista_start` or an earlier call) the carry (x, x_prev, t) to continue from.

  grad_fn(λ, µ) -> (E[q·b], E[q] − η); traced=False runs the steps as a Python loop, for a
  grad_fn that streams over shards. In λ the two one-sided constraints become one term
  −ε|λ| whose proximal map is a soft threshold, so each step is ascent, shrink by lr·P·ε,
  clip to [−V, V] (V = consts.cap).
  """
  def prox_ascent(x):
    gl, gmu = grad_fn(*x)
    def prox(lam, g, eps, p):
      z = lam + lr * p * g
      z = jnp.sign(z) * jnp.maximum(jnp.abs(z) - lr * p * eps, 0.0)
      return jnp.clip(z, -consts.cap, consts.cap)
    return jax.tree.map(prox, x[0], gl, consts.eps, consts.precond), x[1] + lr * gmu

  def body(_, carry):
    x, x_prev, t = carry
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y = jax.tree.map(lambda a, b: a + (t - 1.0) / t_next * (a - b), x, x_prev)
    x_new = prox_ascent(y)
    # Restart the momentum when the step it produced points back (O'Donoghue & Candès).
    back = sum(jnp.vdot(xn - yy, xn - xx) for xn, yy, xx in
               zip(jax.tree.leaves(x_new), jax.tree.leaves(y), jax.tree.leaves(x)))
    return x_new, x, jnp.where(back < 0, 1.0, t_next)

  given = carry is not None
  carry = carry if given else fista_start(lam, mu)
  if traced:
    carry = jax.lax.fori_loop(0, steps, body, carry)
  else:
    for i in range(steps):
      carry = body(i, carry)
  return carry if given else carry[0]


def fista_start(lam, mu):
  """A FISTA carry at (λ, µ) with no momentum."""
  return ((lam, mu), (lam, mu), jnp.float32(1))


@functools.partial(jax.jit, static_argnames=("layout", "steps"))
def refine(lam, mu, ex: Examples, mask, consts: Consts, lr, *, layout: Layout, steps: int):
  """`fista` on exact gradients over all the solver's rows (one pass per step)."""
  def local(ex, mask, lam, mu, consts, lr):
    grad = lambda lam, mu: _full_gradient(lam, mu, ex, mask, consts, layout.batch, layout.total)
    return fista(grad, lam, mu, consts, lr, steps)
  return _run(layout, local, (ex, mask), (lam, mu, consts, lr))


@functools.partial(jax.jit, static_argnames=("layout", "steps"))
def refine_carry(carry, ex: Examples, mask, consts: Consts, lr, *, layout: Layout, steps: int):
  """`steps` more FISTA steps from a carry (momentum kept across calls); returns the carry."""
  def local(ex, mask, carry, consts, lr):
    grad = lambda lam, mu: _full_gradient(lam, mu, ex, mask, consts, layout.batch, layout.total)
    return fista(grad, None, None, consts, lr, steps, carry=carry)
  return _run(layout, local, (ex, mask), (carry, consts, lr))


@functools.partial(jax.jit, static_argnames=("layout",))
def gradient(lam, mu, ex: Examples, mask, consts: Consts, *, layout: Layout):
  """The exact dual gradient over all the solver's rows, one pass: (E[q·b] tree, E[q] − η)."""
  def local(ex, mask, lam, mu, consts):
    return _full_gradient(lam, mu, ex, mask, consts, layout.batch, layout.total)
  return _run(layout, local, (ex, mask), (lam, mu, consts))


def flat(tree: dict) -> np.ndarray:
  """A constraint tree as one float64 vector [K] (rep, assoc, proxy; row-major)."""
  return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1)
                         for k in ("rep", "assoc", "proxy")])


def unflat(x, like: dict) -> dict:
  """Inverse of `flat`, shaped like `like` (float32)."""
  out, i = {}, 0
  for k in ("rep", "assoc", "proxy"):
    size = int(np.prod(np.shape(like[k])))
    out[k] = np.asarray(x[i:i + size], np.float32).reshape(np.shape(like[k]))
    i += size
  return out


def _host(tree):
  """Small arrays as host numpy, so jitted phases see one kind of input whichever phase
  produced them (device outputs of another sharding would compile the phase again)."""
  return jax.tree.map(np.asarray, tree)


def solve(ex: Examples, pi, eps: dict, config, init: dict | None = None, devices=None,
          sampled: bool = False):
  """Both ascent phases on host Examples [n, ...] (a sample of the data, or all of it).

  The stochastic phase runs at the first cap of `ladder`, then `converge` takes the exact
  phase up the ladder to V (at most optim.refine_steps exact steps). init: optional warm
  start {'v': constraint tree [2, ...], 'mu': float} (M4Result.duals); then both phases run
  at V alone, from it. sampled: `ex` is a uniform sample of the data (`converge`). Every
  process must pass the same rows. Returns a `Solution`.
  """
  # convergence.py builds on this module's passes, so it is imported here, not at the top.
  # pylint: disable-next=g-import-not-at-top
  from siglip_fair.balance.convergence import converge, ladder
  o = config.optim
  c = ex.y.shape[1]
  eps = fold_tree(eps)
  layout = make_layout(len(ex.u), config, devices)
  bex, mask = to_blocks(fold(ex), layout)
  exact = _exact_rows(ex, config, devices, unmerged=(layout, bex, mask))
  caps = [float(config.V)] if init is not None else ladder(config.V, config)
  consts = Consts(jnp.asarray(pi), jnp.float32(config.eta), jax.tree.map(jnp.asarray, eps),
                  None, jnp.float32(caps[0]))
  consts = consts._replace(precond=jacobi(*exact[1:], consts.pi, layout=exact[0]))
  lipschitz = curvature(*exact[1:], consts, layout=exact[0], iters=o.power_iters)
  # Power iteration approaches λ_max from below; the margin keeps steps under 1 / L.
  unit = 1.0 / (1.1 * float(lipschitz))
  if init is None:
    v0 = jax.tree.map(lambda e: jnp.zeros((2,) + e.shape, jnp.float32), consts.eps)
    mu0 = jnp.float32(0)
  else:
    v0 = jax.tree.map(lambda e, v: jnp.asarray(v, jnp.float32).reshape((2,) + e.shape),
                      consts.eps, fold_tree(jax.tree.map(np.asarray, init["v"])))
    mu0 = jnp.float32(init["mu"])
  epochs = -(-o.steps // layout.steps)
  lam, mu, taken = jax.tree.map(lambda v: v[0] - v[1], v0), mu0, 0
  if epochs:
    state = stochastic_ascent(bex, mask, consts, shuffles(config.seed, epochs, layout),
                              jnp.float32(o.lr * unit), jnp.float32(o.decay_steps),
                              jnp.float32(o.average_from), v0, mu0, layout=layout)
    lam, mu, taken = jax.tree.map(lambda v: v[0] - v[1], state.v_avg), state.mu_avg, state.step
  lam, mu, lam_v, mu_v, conv, path = converge(lam, mu, exact, consts, unit, config, caps,
                                               o.refine_steps, flat(eps), sampled)
  info = dict(stochastic_steps=int(taken), epochs=epochs, refine_steps=conv["steps"],
              curvature=float(lipschitz), devices=layout.mesh.size, blocks=layout.blocks,
              exact_rows=exact[0].n, convergence=dict(conv, rows="solve"))
  return Solution(unfold_tree(_host(lam), c), float(mu), unfold_tree(_host(lam_v), c),
                  float(mu_v), consts._replace(cap=jnp.float32(config.V)), float(unit), info,
                  path, caps)


class Solution(NamedTuple):
  """What `solve` and `polish` return. (lam, mu) give q; (lam_v, mu_v) are the duals at the
  cap V (the prices; different only when the solution settled at a lower cap, `converge`)."""
  lam: dict      # signed duals, numpy constraint tree (unfolded)
  mu: float
  lam_v: dict
  mu_v: float
  consts: Consts
  unit: float    # FISTA's step 1 / L
  info: dict
  path: list     # (cap, (λ, µ) folded) per rung solved
  caps: list     # the ladder


def polish(ex: Examples, solution: Solution, config, steps: int, devices=None,
           sampled: bool = False) -> Solution:
  """The exact phase again on host rows `ex` (a larger sample than the solve's, or all rows):
  the same ladder, from the solve's first rung, at most `steps` exact steps. Rungs start
  close to their solution (the solve's rows are a subset of these), and the climb stops
  where the solution settles, as in the solve. sampled: `ex` is a sample of the data
  (`converge`). The preconditioner and step come from the
  solve; the step is shrunk by 1.25, since the curvature was bounded on the smaller sample.
  """
  from siglip_fair.balance.convergence import converge  # pylint: disable=g-import-not-at-top
  c = ex.y.shape[1]
  rows = _exact_rows(ex, config, devices)
  consts = solution.consts
  _, (lam0, mu0) = solution.path[0]
  lam, mu, lam_v, mu_v, conv, path = converge(
      lam0, mu0, rows, consts, solution.unit / 1.25, config, solution.caps, steps,
      flat(_host(consts.eps)), sampled)
  info = dict(solution.info, polish_rows=rows[0].n, polish_steps=conv["steps"],
              convergence=dict(conv, rows="polish"))
  return solution._replace(lam=unfold_tree(_host(lam), c), mu=float(mu),
                           lam_v=unfold_tree(_host(lam_v), c), mu_v=float(mu_v), info=info,
                           path=path)


def fold(ex: Examples) -> Examples:
  """Labels and proxies as one [n, c + p] matrix y (w becomes [n, 0]): every formula treats
  the columns of y and w alike, and one wide product per step is about twice as fast on CPU
  as two narrow ones."""
  y = np.concatenate([np.asarray(ex.y), np.asarray(ex.w)], axis=1)
  return ex._replace(y=y, w=np.asarray(ex.w)[:, :0])


def fold_tree(tree: dict) -> dict:
  """A constraint tree in `fold`'s columns: proxies appended to the labels (last axis)."""
  return dict(rep=tree["rep"], assoc=np.concatenate([tree["assoc"], tree["proxy"]], axis=-1),
              proxy=np.asarray(tree["proxy"])[..., :0])


def unfold_tree(tree: dict, c: int) -> dict:
  """Inverse of `fold_tree` for c labels."""
  return dict(rep=tree["rep"], assoc=tree["assoc"][..., :c], proxy=tree["assoc"][..., c:])


def _exact_rows(ex: Examples, config, devices, unmerged=None):
  """(layout, blocks, mask) of `fold(ex)` for the exact phases, with identical rows merged into
  weighted ones (`merge.py`) when that pays and optim.merge_identical is on; else `unmerged`
  (the caller's blocks of `fold(ex)`, reused rather than placed twice) or all rows placed.
  Folding after the merge copies only the distinct rows."""
  merged = merge.merge_identical(ex) if config.optim.get("merge_identical", True) else None
  if merged is None:
    if unmerged is not None:
      return unmerged
    layout = make_layout(len(ex.u), config, devices)
    return (layout, *to_blocks(fold(ex), layout))
  rows, weights = merged
  layout = make_layout(len(rows.u), config, devices, total=len(ex.u))
  return (layout, *to_blocks(fold(rows), layout, weights))
