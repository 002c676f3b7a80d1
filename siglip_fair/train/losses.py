"""Contrastive losses on L2-normalised embeddings: SigLIP (sigmoid) and CLIP (softmax).

Both take the full (global) batch: row i of `zimg` and row i of `ztxt` are a positive pair,
every other pairing is a negative. Under jit with batch-sharded inputs XLA gathers what the
[B, B] logits need; chunked / ring variants that never materialise them can share this
signature.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

LOSS_NAMES = ("sigmoid", "softmax")


def _check(zimg, ztxt, weights):
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(
        f"zimg and ztxt must both be [B, D] with the same shape; got {zimg.shape}, {ztxt.shape}.")
  if weights is not None and weights.shape != zimg.shape[:1]:
    raise ValueError(f"weights must be [B]={zimg.shape[:1]}, got {weights.shape}.")


def _pair_count(n):
  """The number of negatives n·(n − 1) of an [n, n] logit matrix, as a float (at least 1).

  The count overflows int32 from n = 46,342 on, and JAX parses a Python int divisor as int32:
  a static n is multiplied exactly as Python ints and only then turned into a float; a traced
  n (the ring's count of valid rows, in the embeddings' dtype) is promoted to float32 first.

  Args:
    n: batch size, a Python int (a static shape) or a scalar array.

  Returns:
    max(n·(n − 1), 1): a Python float for an int n, else a float32 scalar.
  """
  if isinstance(n, numbers.Integral):
    n = int(n)
    return float(max(n * (n - 1), 1))
  n = jnp.asarray(n, jnp.float32)
  return jnp.maximum(n * (n - 1.0), 1.0)


def _logit_stats(logits) -> dict:
  """{'pos_logit': mean diagonal, 'neg_logit': mean off-diagonal} of [n, n] logits."""
  diag = jnp.trace(logits)
  pos = diag / float(logits.shape[0])
  neg = (jnp.sum(logits) - diag) / _pair_count(logits.shape[0])
  return {"pos_logit": pos, "neg_logit": neg}


def sigmoid_loss(zimg, ztxt, t, b, weights=None):
  """SigLIP pairwise sigmoid loss (Zhai et al., 2023).

  Args:
    zimg: f32 [B, D] image embeddings.
    ztxt: f32 [B, D] text embeddings; row i pairs with image i.
    t: scalar temperature (already exponentiated).
    b: scalar logit bias.
    weights: optional f32 [B] per-example weights (e.g. balancing weights) scaling image i's
      row of B pair terms.

  Returns:
    (loss, metrics): loss = -1/B * sum_i w_i * sum_j log sigmoid(l_ij * (t <zimg_i, ztxt_j> + b)),
    l_ij = +1 if i == j else -1 (the paper's normalisation: sum over texts, mean over images);
    metrics = {'pos_logit', 'neg_logit'}: mean diagonal / off-diagonal logit.
  """
  _check(zimg, ztxt, weights)
  logits = t * zimg @ ztxt.T + b
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  per_image = -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1)
  if weights is not None:
    per_image = per_image * weights
  return jnp.mean(per_image), _logit_stats(logits)


def softmax_loss(zimg, ztxt, t, weights=None):
  """CLIP symmetric InfoNCE loss (Radford et al., 2021).

  Args:
    zimg: f32 [B, D] image embeddings.
    ztxt: f32 [B, D] text embeddings; row i pairs with image i.
    t: scalar temperature (already exponentiated).
    weights: optional f32 [B] per-example weights scaling pair i's two cross-entropy terms.

  Returns:
    (loss, metrics): loss = 1/B * sum_i w_i * (CE_i(image->texts) + CE_i(text->images)) / 2 with
    logits t <zimg_i, ztxt_j>; metrics = {'pos_logit', 'neg_logit'}.
  """
  _check(zimg, ztxt, weights)
  logits = t * zimg @ ztxt.T
  diag = jnp.diagonal(logits)
  img2txt = jax.nn.logsumexp(logits, axis=1) - diag
  txt2img = jax.nn.logsumexp(logits, axis=0) - diag
  per_pair = 0.5 * (img2txt + txt2img)
  if weights is not None:
    per_pair = per_pair * weights
  return jnp.mean(per_pair), _logit_stats(logits)


def contrastive_loss(name: str, zimg, ztxt, extras: dict, weights=None):
  """Dispatches on config.loss: 'sigmoid' (uses extras t and b) or 'softmax' (uses t)."""
  if name == "sigmoid":
    return sigmoid_loss(zimg, ztxt, extras["t"], extras["b"], weights)
  if name == "softmax":
    return softmax_loss(zimg, ztxt, extras["t"], weights)
  raise ValueError(f"config.loss={name!r}; use 'sigmoid' (SigLIP) or 'softmax' (CLIP).")
