"""Contrastive losses chunked over image rows inside one device: never the whole [B, B] logits.

`lax.scan` walks blocks of `chunk` image rows; each step scores its block against all B texts,
so only a [chunk, B] logit block is live at a time. Each step is wrapped in `jax.checkpoint`,
so the backward pass recomputes a block's logits rather than keeping every block's residuals
(which together would be the [B, B] matrix again). When B % chunk != 0 the last block is padded
with zero rows that count neither as anchors nor (for CLIP) in the column log-sum-exps.
  * sigmoid: every pair is scored as a negative and the B positives are corrected afterwards
    from the O(B·D) diagonal, as in `ring_losses`;
  * softmax: row log-sum-exps come out per block; column (text->image) log-sum-exps
    accumulate online across blocks with `logaddexp`.
Values and metrics equal `losses.sigmoid_loss` / `losses.softmax_loss` up to float rounding.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from siglip_fair.train.losses import _check, _pair_count

_NEG = -1e30  # log of zero mass for padded rows (finite, so 0 * _NEG stays 0 in gradients)


def _check_chunk(chunk):
  # A traced or float chunk would make the block shapes data-dependent; bool is an int in Python.
  if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk <= 0:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}.")


def _blocks(zimg, weights, chunk):
  """Pads and reshapes the image side into [n_blocks, chunk, ...] scan inputs."""
  _check_chunk(chunk)
  n = zimg.shape[0]
  chunk = max(min(int(chunk), n), 1)  # chunk >= B is one block, without padding
  pad = -n % chunk
  weights = jnp.ones((n,), zimg.dtype) if weights is None else weights.astype(zimg.dtype)
  valid = jnp.ones((n,), zimg.dtype)
  grow = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  split = lambda x: grow(x).reshape((-1, chunk) + x.shape[1:])
  return split(zimg), split(weights), split(valid), weights


def _metrics(pos, all_sum):
  """Mean positive and negative logit from the diagonal [n] and the sum of all n² logits."""
  return {"pos_logit": jnp.mean(pos),
          "neg_logit": (all_sum - jnp.sum(pos)) / _pair_count(pos.shape[0])}


def sigmoid_chunked_loss(zimg, ztxt, t, b, weights=None, *, chunk: int):
  """SigLIP loss, scanning blocks of `chunk` image rows.

  Args:
    zimg, ztxt: f32 [B, D] embeddings; row i of each is a positive pair.
    t, b: scalar temperature (already exponentiated) and bias.
    weights: optional f32 [B] per-image weights.
    chunk: image rows per block (positive int); peak logits memory is [chunk, B].

  Returns:
    (loss, {'pos_logit', 'neg_logit'}), as `losses.sigmoid_loss`.
  """
  _check(zimg, ztxt, weights)
  img, rows_w, rows_valid, weights = _blocks(zimg, weights, chunk)
  t, b = jnp.asarray(t, zimg.dtype), jnp.asarray(b, zimg.dtype)

  def block(carry, xs):
    # Row masks enter as vector-matrix products: a broadcast [chunk, B] mask would be another
    # block-sized buffer, and padded rows must drop out of both the loss and neg_logit.
    loss, all_sum = carry
    zi, w, valid = xs
    logits = t * zi @ ztxt.T + b
    loss = loss + (w * valid) @ jnp.sum(jax.nn.softplus(logits), axis=1)  # -log σ(-x)
    all_sum = all_sum + valid @ jnp.sum(logits, axis=1)
    return (loss, all_sum), None

  zero = jnp.zeros((), zimg.dtype)
  (loss, all_sum), _ = jax.lax.scan(jax.checkpoint(block), (zero, zero),
                                    (img, rows_w, rows_valid))
  # The scan scored the positives as negatives; swap their terms for the positive ones.
  pos = t * jnp.sum(zimg * ztxt, axis=1) + b
  loss = loss + jnp.sum(weights * (jax.nn.log_sigmoid(-pos) - jax.nn.log_sigmoid(pos)))
  return loss / zimg.shape[0], _metrics(pos, all_sum)


def softmax_chunked_loss(zimg, ztxt, t, weights=None, *, chunk: int):
  """CLIP symmetric InfoNCE loss, scanning blocks of `chunk` image rows.

  Arguments as `sigmoid_chunked_loss` (no bias). Returns (loss, {'pos_logit', 'neg_logit'}),
  as `losses.softmax_loss`.
  """
  _check(zimg, ztxt, weights)
  img, _, rows_valid, weights = _blocks(zimg, weights, chunk)
  t = jnp.asarray(t, zimg.dtype)

  def block(carry, xs):
    col_lse, all_sum = carry
    zi, valid = xs
    logits = t * zi @ ztxt.T
    # Padded rows get zero mass, so they vanish from the column sums (their own row lse is
    # sliced off below).
    masked = logits + jnp.where(valid > 0, 0.0, _NEG)[:, None]
    col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(masked, axis=0))
    all_sum = all_sum + valid @ jnp.sum(logits, axis=1)
    return (col_lse, all_sum), jax.nn.logsumexp(logits, axis=1)

  init = (jnp.full(zimg.shape[:1], _NEG, zimg.dtype), jnp.zeros((), zimg.dtype))
  (col_lse, all_sum), row_lse = jax.lax.scan(jax.checkpoint(block), init, (img, rows_valid))
  row_lse = row_lse.reshape(-1)[: zimg.shape[0]]
  diag = t * jnp.sum(zimg * ztxt, axis=1)
  per_pair = 0.5 * ((row_lse - diag) + (col_lse - diag)) * weights
  return jnp.mean(per_pair), _metrics(diag, all_sum)


def chunked_loss(name: str, chunk: int):
  """fn(zimg [B, D], ztxt [B, D], t, b, weights [B] | None) -> (loss, metrics) running the
  row-chunked variant of `name` ('sigmoid' | 'softmax'; softmax ignores b)."""
  if name not in ("sigmoid", "softmax"):
    raise ValueError(f"chunked_loss: unknown loss {name!r}; use 'sigmoid' or 'softmax'.")
  _check_chunk(chunk)  # fail when the loss is configured, not at the first traced step

  def loss_fn(zimg, ztxt, t, b=0.0, weights=None):
    if name == "sigmoid":
      return sigmoid_chunked_loss(zimg, ztxt, t, b, weights, chunk=chunk)
    return softmax_chunked_loss(zimg, ztxt, t, weights, chunk=chunk)

  return loss_fn
