"""Contrastive losses chunked across devices: no device ever holds the [B, B] logits.

Inside `jax.shard_map` every device holds its b = B / D rows of the image and text embeddings.
Text blocks travel round the ring of D devices (`lax.ppermute` to the next device), so at step
k device i scores its images against the texts of device i − k:
  * sigmoid (SigLIP paper, §3.3): every block is scored as negatives and the positives (the
    diagonal of the k = 0 block, i.e. the local pairs) are corrected afterwards; per-device
    partial sums meet in one `psum`;
  * softmax (CLIP), all-gather-free: row log-sum-exps of the local images accumulate online;
    the visiting text block carries its column log-sum-exp partials along and comes home after
    D hops with the full column sums, where its txt->img terms are taken.
Both have custom VJPs whose backward pass sends the blocks round the ring a second time, each
with its gradient accumulator, so nothing O(B·D) is kept for it either.
Peak temporary memory per device is O(b²) instead of O(B²). Rows that are padding (`valid` 0,
e.g. a global batch that does not divide into D equal blocks) are dropped as anchors and as
negatives, so the losses equal `losses.sigmoid_loss` / `softmax_loss` on the valid rows.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from siglip_fair.train.losses import _pair_count

_NEG = -1e30  # log of zero mass for masked logits (finite, so 0 * _NEG stays 0)


def _ring(axis_name):
  size = jax.lax.axis_size(axis_name)
  return size, [(i, (i + 1) % size) for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _negatives(zimg, ztxt, t, b, rows, valid, axis_name):
  """This device's images scored against every text of the batch, all as negatives:
  S = Σ_k rows · softplus(t zimg txt_kᵀ + b) · valid_k, with text block k visiting via the ring.

  A custom VJP because autodiff of the ring scan would keep every visiting [b, D] text block for
  the backward pass (O(B·D) per device); the backward rule instead sends the blocks round the
  ring a second time, each with its gradient accumulator riding along (SigLIP paper, §3.3).
  """
  return _negatives_fwd(zimg, ztxt, t, b, rows, valid, axis_name)[0]


def _negatives_fwd(zimg, ztxt, t, b, rows, valid, axis_name):
  size, perm = _ring(axis_name)

  def block(carry, _):
    txt, txt_valid, total = carry
    # Masks enter as matrix-vector products, so the body holds one [b, b] buffer and its
    # softplus, never a broadcast mask.
    total = total + rows @ (jax.nn.softplus(t * zimg @ txt.T + b) @ txt_valid)
    txt, txt_valid = jax.lax.ppermute((txt, txt_valid), axis_name, perm)
    return (txt, txt_valid, total), None

  zero = jax.lax.pcast(jnp.zeros((), zimg.dtype), axis_name, to="varying")
  (_, _, total), _ = jax.lax.scan(block, (ztxt, valid, zero), None, length=size)
  return total, (zimg, ztxt, t, b, rows, valid)


def _negatives_bwd(axis_name, residuals, g):
  zimg, ztxt, t, b, rows, valid = residuals
  size, perm = _ring(axis_name)

  def block(carry, _):
    txt, txt_valid, dtxt, dzimg, drows, dt, db = carry
    logits = t * zimg @ txt.T + b
    # dS/dlogits = rows ⊗ valid_k · σ(logits); softplus' = σ.
    grad = g * rows[:, None] * jax.nn.sigmoid(logits) * txt_valid[None, :]
    grad_txt = grad @ txt                                  # [b, D]
    dzimg = dzimg + t * grad_txt
    dtxt = dtxt + t * grad.T @ zimg
    dt = dt + jnp.sum(zimg * grad_txt)                     # Σ grad ∘ (zimg txtᵀ)
    db = db + jnp.sum(grad)
    drows = drows + g * (jax.nn.softplus(logits) @ txt_valid)
    # The text block and the gradient of its rows travel on together; after `size` hops both
    # are home, the accumulator holding every device's contribution.
    txt, txt_valid, dtxt = jax.lax.ppermute((txt, txt_valid, dtxt), axis_name, perm)
    return (txt, txt_valid, dtxt, dzimg, drows, dt, db), None

  zeros = jnp.zeros_like
  init = (ztxt, valid, zeros(ztxt), zeros(zimg), zeros(rows), zeros(t), zeros(b))
  (_, _, dtxt, dzimg, drows, dt, db), _ = jax.lax.scan(block, init, None, length=size)
  return dzimg, dtxt, dt, db, drows, zeros(valid)


_negatives.defvjp(_negatives_fwd, _negatives_bwd)


def sigmoid_ring_loss(zimg, ztxt, t, b, weights, valid, *, axis_name: str):
  """SigLIP loss over the global batch, from this device's rows; call inside shard_map.

  Args:
    zimg, ztxt: f32 [b, D] this device's embeddings (row i pairs with row i).
    t, b: scalar temperature and bias (replicated).
    weights: f32 [b] per-image weights (ones for none).
    valid: f32 [b], 1 for real rows, 0 for padding.
    axis_name: the mesh axis (or axes) the batch is split over.

  Returns:
    (loss, metrics) replicated over the axis: as `losses.sigmoid_loss` on the valid rows.
    Memory per device: O(b²) for one logit block plus O(b·D), forward and backward.
  """
  rows = valid * weights
  # Per-device copies of t and b: the custom VJP returns per-device partial gradients, which
  # the transpose of this cast sums over the axis.
  varying = lambda x: jax.lax.pcast(x, axis_name, to="varying")
  loss = _negatives(zimg, ztxt, varying(t), varying(b), rows, valid, axis_name)
  # Every pair was scored as a negative; the positives (this device's own pairs) are corrected.
  pos = t * jnp.sum(zimg * ztxt, axis=1) + b
  loss = loss + jnp.sum(rows * (jax.nn.log_sigmoid(-pos) - jax.nn.log_sigmoid(pos)))
  # Mean logit over all pairs in closed form: Σ_rc (t zimg_r·ztxt_c + b) = t (Σ zimg)·(Σ ztxt)
  # + b n², so the metric needs no second pass over the blocks.
  sum_img, sum_txt, pos_sum, n, loss = jax.lax.psum(
      (valid @ zimg, valid @ ztxt, jnp.sum(pos * valid), jnp.sum(valid), loss), axis_name)
  all_sum = t * sum_img @ sum_txt + b * n * n
  return loss / n, {"pos_logit": pos_sum / n,
                    "neg_logit": (all_sum - pos_sum) / _pair_count(n)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _log_sum_exps(zimg, ztxt, t, valid, axis_name):
  """Row log-sum-exps of this device's images over all texts, and column log-sum-exps of this
  device's texts over all images: (row_lse [b], col_lse [b]), padding masked out.

  The column partials ride round the ring with their text block and come home complete after
  D hops. A custom VJP, like `_negatives`, so the backward pass re-sends the blocks instead of
  keeping every visiting one.
  """
  return _log_sum_exps_fwd(zimg, ztxt, t, valid, axis_name)[0]


def _masked_logits(zimg, txt, t, valid, txt_valid):
  return (t * zimg @ txt.T + jnp.where(valid > 0, 0.0, _NEG)[:, None]
          + jnp.where(txt_valid > 0, 0.0, _NEG)[None, :])


def _log_sum_exps_fwd(zimg, ztxt, t, valid, axis_name):
  size, perm = _ring(axis_name)

  def block(carry, _):
    txt, txt_valid, col_lse, row_lse = carry
    masked = _masked_logits(zimg, txt, t, valid, txt_valid)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(masked, axis=1))
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(masked, axis=0))
    txt, txt_valid, col_lse = jax.lax.ppermute((txt, txt_valid, col_lse), axis_name, perm)
    return (txt, txt_valid, col_lse, row_lse), None

  start = jax.lax.pcast(jnp.full(zimg.shape[:1], _NEG, zimg.dtype), axis_name, to="varying")
  (_, _, col_lse, row_lse), _ = jax.lax.scan(block, (ztxt, valid, start, start), None,
                                             length=size)
  return (row_lse, col_lse), (zimg, ztxt, t, valid, row_lse, col_lse)


def _log_sum_exps_bwd(axis_name, residuals, cotangents):
  zimg, ztxt, t, valid, row_lse, col_lse = residuals
  g_row, g_col = cotangents
  size, perm = _ring(axis_name)

  def block(carry, _):
    txt, txt_valid, lse, g, dtxt, dzimg, dt = carry
    masked = _masked_logits(zimg, txt, t, valid, txt_valid)
    # d lse / d logits is a softmax; masked entries are exp(-1e30) = 0.
    grad = (g_row[:, None] * jnp.exp(masked - row_lse[:, None])
            + g[None, :] * jnp.exp(masked - lse[None, :]))
    grad_txt = grad @ txt
    dzimg = dzimg + t * grad_txt
    dtxt = dtxt + t * grad.T @ zimg
    dt = dt + jnp.sum(zimg * grad_txt)
    txt, txt_valid, lse, g, dtxt = jax.lax.ppermute((txt, txt_valid, lse, g, dtxt), axis_name,
                                                    perm)
    return (txt, txt_valid, lse, g, dtxt, dzimg, dt), None

  init = (ztxt, valid, col_lse, g_col, jnp.zeros_like(ztxt), jnp.zeros_like(zimg),
          jnp.zeros_like(t))
  (_, _, _, _, dtxt, dzimg, dt), _ = jax.lax.scan(block, init, None, length=size)
  return dzimg, dtxt, dt, jnp.zeros_like(valid)


_log_sum_exps.defvjp(_log_sum_exps_fwd, _log_sum_exps_bwd)


def softmax_ring_loss(zimg, ztxt, t, weights, valid, *, axis_name: str):
  """CLIP loss over the global batch without gathering it; call inside shard_map.

  Arguments as `sigmoid_ring_loss` (no bias). Returns (loss, metrics) replicated: as
  `losses.softmax_loss` on the valid rows.
  """
  varying = lambda x: jax.lax.pcast(x, axis_name, to="varying")
  row_lse, col_lse = _log_sum_exps(zimg, ztxt, varying(t), valid, axis_name)
  diag = t * jnp.sum(zimg * ztxt, axis=1)
  per_pair = 0.5 * ((row_lse - diag) + (col_lse - diag)) * weights * valid
  sum_img, sum_txt, pos_sum, n, loss = jax.lax.psum(
      (valid @ zimg, valid @ ztxt, jnp.sum(diag * valid), jnp.sum(valid), jnp.sum(per_pair)),
      axis_name)
  all_sum = t * sum_img @ sum_txt  # Σ over all valid pairs of t zimg·ztxt, in closed form
  return loss / n, {"pos_logit": pos_sum / n,
                    "neg_logit": (all_sum - pos_sum) / _pair_count(n)}


def ring_loss(name: str, mesh, axis: str = "data"):
  """A global-batch loss fn(zimg [B, D], ztxt [B, D], t, b, weights [B] | None) -> (loss,
  metrics) that runs the ring variant of `name` ('sigmoid' | 'softmax') over `axis` of `mesh`.

  B need not divide by the axis size: the batch is zero-padded to the next multiple and the
  padding is masked out.
  """
  if name not in ("sigmoid", "softmax"):
    raise ValueError(f"ring_loss: unknown loss {name!r}; use 'sigmoid' or 'softmax'.")
  # A tuple of axes (e.g. ('data', 'fsdp')) is one ring over their flattened devices.
  size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))

  def local(zimg, ztxt, t, b, weights, valid):
    if name == "sigmoid":
      return sigmoid_ring_loss(zimg, ztxt, t, b, weights, valid, axis_name=axis)
    return softmax_ring_loss(zimg, ztxt, t, weights, valid, axis_name=axis)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P(), P(axis),
                                                      P(axis)), out_specs=P())

  @functools.wraps(local)
  def loss_fn(zimg, ztxt, t, b=0.0, weights=None):
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
      raise ValueError(f"zimg and ztxt must both be [B, D] with the same shape; got "
                       f"{zimg.shape}, {ztxt.shape}.")
    n = zimg.shape[0]
    pad = -n % size
    weights = jnp.ones((n,), zimg.dtype) if weights is None else weights
    valid = jnp.ones((n,), zimg.dtype)
    if pad:
      grow = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      zimg, ztxt, weights, valid = map(grow, (zimg, ztxt, weights, valid))
    return sharded(zimg, ztxt, jnp.asarray(t, zimg.dtype), jnp.asarray(b, zimg.dtype),
                   weights, valid)

  return loss_fn
