"""Gradient accumulation over micro-batches, for batches larger than a device holds.

A contrastive loss is not a sum over examples: every example's negatives are the rest of the
batch. So accumulation comes in two kinds (config.accum_mode):

  'cached' (the default; open_clip's --accum-freq): a first pass embeds every micro-batch
    without gradients; then each micro-batch is embedded again with gradients and the loss of
    the WHOLE batch is taken with the other micro-batches' embeddings held fixed. The summed
    gradients are exactly the large batch's (same loss, same negatives) at the cost of one more
    forward pass; only one micro-batch's activations are alive at a time.
  'micro': each micro-batch's own loss (its negatives are its own rows only), gradients
    averaged: cheaper, but the model then trains on a smaller contrastive batch, as if
    batch_size / accum_steps were the batch (with an accumulated optimizer step).

Micro-batch j holds the rows i with i % steps == j of every device's share of the batch, so
splitting needs no communication between devices.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ACCUM_MODES = ("cached", "micro")


def split(tree, steps: int):
  """[B, ...] leaves -> [steps, B / steps, ...]; micro-batch j is rows j, j + steps, ...."""
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1), tree)


def unsplit(tree):
  """The inverse of `split`: [steps, b, ...] -> [steps * b, ...] in the original row order."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def loss_and_grads(apply_fn: Callable, compute_loss: Callable, params, batch: dict, key, *,
                   steps: int = 1, mode: str = "cached", constrain: Callable = lambda x: x):
  """(loss, metrics, extras, grads) of one optimizer step, accumulated over `steps` micro-batches.

  apply_fn(params, image, text, key) -> (zimg [b, D], ztxt [b, D], extras with 't', 'b');
  compute_loss(zimg, ztxt, extras, weight [b] | None) -> (loss, metrics).
  batch: {'image' [B, H, W, 3], 'text' [B, L], optional 'weight' [B]}, B divisible by steps.
  constrain: applied to the split batch (a sharding constraint keeping the rows where they are).
  Micro-batch j's dropout key is fold_in(key, j), in both passes of 'cached'.
  """
  weight = batch.get("weight")

  def plain(p, mb, k):
    zimg, ztxt, extras = apply_fn(p, mb["image"], mb["text"], k)
    loss, metrics = compute_loss(zimg, ztxt, extras, mb.get("weight"))
    return loss, (metrics, extras)

  if steps == 1:
    (loss, (metrics, extras)), grads = jax.value_and_grad(plain, has_aux=True)(params, batch,
                                                                               key)
    return loss, metrics, extras, grads
  if mode not in ACCUM_MODES:
    raise ValueError(f"config.accum_mode={mode!r}; use one of {ACCUM_MODES}.")
  micro = constrain(split(batch, steps))
  index = jnp.arange(steps)
  zeros = jax.tree.map(jnp.zeros_like, params)

  if mode == "micro":
    def body(acc, xs):
      mb, j = xs
      (loss, aux), g = jax.value_and_grad(plain, has_aux=True)(params, mb,
                                                               jax.random.fold_in(key, j))
      return jax.tree.map(jnp.add, acc, g), (loss, aux)

    grads, (losses, (metrics, extras)) = jax.lax.scan(body, zeros, (micro, index))
    mean = lambda x: jnp.mean(x, 0)  # noqa: E731
    return (mean(losses), jax.tree.map(mean, metrics), jax.tree.map(lambda x: x[0], extras),
            jax.tree.map(lambda g: g / steps, grads))

  def embed(_, xs):
    mb, j = xs
    zimg, ztxt, _ = apply_fn(params, mb["image"], mb["text"], jax.random.fold_in(key, j))
    return None, (zimg, ztxt)

  _, cached = jax.lax.scan(embed, None, (micro, index))
  cached = jax.lax.stop_gradient(cached)  # [steps, b, D] each

  def whole_batch_loss(p, mb, j):
    zimg, ztxt, extras = apply_fn(p, mb["image"], mb["text"], jax.random.fold_in(key, j))
    zimg_all, ztxt_all = (unsplit(c.at[j].set(z)) for c, z in zip(cached, (zimg, ztxt)))
    # t and b enter the loss directly, not through an embedding: only one pass may carry
    # their gradient, or it would be counted `steps` times.
    scalars = {k: jnp.where(j == 0, extras[k], jax.lax.stop_gradient(extras[k]))
               for k in ("t", "b") if extras.get(k) is not None}
    loss, metrics = compute_loss(zimg_all, ztxt_all, {**extras, **scalars}, weight)
    return loss, (metrics, extras)

  def body(acc, xs):
    mb, j = xs
    (loss, aux), g = jax.value_and_grad(whole_batch_loss, has_aux=True)(params, mb, j)
    return jax.tree.map(jnp.add, acc, g), (loss, aux)

  grads, (losses, (metrics, extras)) = jax.lax.scan(body, zeros, (micro, index))
  first = lambda x: x[0]  # noqa: E731  (every pass computes the same whole-batch loss)
  return (first(losses), jax.tree.map(first, metrics), jax.tree.map(first, extras), grads)
