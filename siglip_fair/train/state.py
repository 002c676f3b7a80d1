"""Train state, its initialisation, and the sharded, jitted train step."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from siglip_fair.train import accumulate, chunked_losses, ring_losses
from siglip_fair.train.losses import LOSS_NAMES, contrastive_loss


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, checkpointed as a whole.

  step: int32 [] optimiser steps taken.
  params: model parameters.
  opt_state: optax state.
  rng: uint32 [2] raw key data (`jax.random.key_data`); raw data checkpoints like any array.
  nonfinite_steps: int32 [] steps whose loss, gradients or updated parameters were NaN/Inf
    (their updates are dropped under nonfinite='skip'); checkpointed, so the count survives a
    resume.
  ema_params: an exponential moving average of `params` (config.ema_decay > 0), the weights
    that are evaluated and exported; None (no leaves, the earlier checkpoint layout) when off.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_steps: jax.Array = np.int32(0)  # a numpy scalar: no device work at import time
  ema_params: Any = None


def eval_params(state: TrainState):
  """The weights to evaluate: the moving average when the state keeps one, else `params`."""
  return state.params if state.ema_params is None else state.ema_params


def ema_decay_at(decay: float, updates):
  """The averaging weight after `updates` applied updates: min(decay, (1 + n) / (10 + n)).

  TF's ExponentialMovingAverage(num_updates=...) warm-up, so that the average is not dominated
  by the initial weights early in a run (0.1 at the first update, `decay` from n = (10 decay - 1)
  / (1 - decay) on, e.g. 890 updates for 0.99).
  """
  n = jnp.asarray(updates, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_names(tree):
  """Pytree like `tree` whose leaves are '/'-joined paths, e.g. 'params/img/embedding/kernel'."""
  return jax.tree.map_with_path(lambda path, _: "/".join(_key_name(k) for k in path), tree)


def make_init_fn(model, tx: optax.GradientTransformation, image, text, *,
                 ema: bool = False) -> Callable:
  """Returns init(seed_key_data uint32 [2]) -> TrainState, shapes taken from example inputs.

  `image` [b, H, W, 3] and `text` [b, L] only provide shapes (b may be 1); jit the result with
  `out_shardings` so parameters are created directly where they live. ema: also keep
  `ema_params`, starting from the initial parameters.
  """
  image = jax.ShapeDtypeStruct((1, *image.shape[1:]), jnp.float32)
  text = jax.ShapeDtypeStruct((1, *text.shape[1:]), jnp.int32)

  def init(rng):
    params_key, state_key = jax.random.split(jax.random.wrap_key_data(rng))
    params = model.init(params_key, jnp.zeros(image.shape, image.dtype),
                        jnp.ones(text.shape, text.dtype))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key),
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None)

  return init


LOSS_IMPLS = ("full", "ring", "chunked")
NONFINITE_POLICIES = ("stop", "skip")


def make_train_step(model, tx: optax.GradientTransformation, loss_name: str, *,
                    schedule: Callable, state_sharding, batch_sharding,
                    loss_impl: str = "full", loss_chunk: int = 1024,
                    nonfinite: str = "stop", ema_decay: float = 0.0, accum_steps: int = 1,
                    accum_mode: str = "cached") -> Callable:
  """Jitted `step(state, batch) -> (state, metrics)`; the input state's buffers are donated.

  loss_impl: 'full' (the [B, B] logits under jit), 'ring' (`ring_losses`: text blocks passed
  round the batch axes of the mesh, O((B / devices)²) memory per device) or 'chunked'
  (`chunked_losses`: blocks of `loss_chunk` image rows scored in turn, O(loss_chunk · B) memory,
  for one large device); all give the same value.

  batch: {'image' f32 [B, H, W, 3], 'text' i32 [B, L], optional 'weight' f32 [B]} global arrays
  sharded by `batch_sharding`. metrics: replicated scalars loss, lr (the one applied), t, b,
  grad_norm, param_norm (of the updated parameters, rejected or not), pos_logit, neg_logit,
  nonfinite (int32 0/1: this step's loss, gradients or updated parameters hold NaN/Inf) and
  nonfinite_steps (the running count, as in the returned state).

  nonfinite: 'stop' applies every update (the loop stops at a non-finite step before saving
  anything); 'skip' keeps the parameters and optimizer state of a non-finite step as they were,
  bit for bit (the step counter still advances, so the batch is consumed). Both are one
  compiled function with the same output shapes: the choice is a select on a scalar flag.

  accum_steps > 1: the gradient is accumulated over that many micro-batches of the global batch
  (`accumulate.loss_and_grads`; accum_mode 'cached' gives the large batch's gradient exactly,
  'micro' each micro-batch's own contrastive loss), then one update is applied.

  ema_decay > 0 (the state must hold `ema_params`): after each applied update,
  ema <- d * ema + (1 - d) * params with d = `ema_decay_at(ema_decay, updates applied)`; a
  skipped step leaves the average as it was.
  """
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"config.ema_decay={ema_decay!r}; use 0 (off) or a value in (0, 1), "
                     "e.g. 0.99.")
  if accum_steps < 1 or accum_mode not in accumulate.ACCUM_MODES:
    raise ValueError(f"config.accum_steps={accum_steps!r}, accum_mode={accum_mode!r}; use "
                     f"steps >= 1 and a mode of {accumulate.ACCUM_MODES}.")
  micro_sharding = jax.sharding.NamedSharding(
      batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
  constrain = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.lax.with_sharding_constraint(x, micro_sharding), tree)
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={nonfinite!r}; use one of {NONFINITE_POLICIES}.")
  if loss_name not in LOSS_NAMES:
    raise ValueError(f"config.loss={loss_name!r}; use one of {LOSS_NAMES}.")
  if loss_impl not in LOSS_IMPLS:
    raise ValueError(f"config.loss_impl={loss_impl!r}; use 'full', 'ring' or 'chunked'.")
  if loss_impl == "ring":
    axis = batch_sharding.spec[0]
    ring = ring_losses.ring_loss(loss_name, batch_sharding.mesh, axis=axis)
    compute_loss = lambda zimg, ztxt, extras, w: ring(zimg, ztxt, extras["t"], extras["b"], w)
  elif loss_impl == "chunked":
    chunked = chunked_losses.chunked_loss(loss_name, loss_chunk)
    compute_loss = lambda zimg, ztxt, extras, w: chunked(zimg, ztxt, extras["t"], extras["b"],
                                                         w)
  else:
    compute_loss = lambda zimg, ztxt, extras, w: contrastive_loss(loss_name, zimg, ztxt, extras,
                                                                  w)

  def step(state: TrainState, batch: dict):
    # A pure function of (rng, step): a resumed run draws the same dropout masks.
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def apply_fn(params, image, text, key):
      return model.apply({"params": params}, image, text, train=True, rngs={"dropout": key})

    loss, metrics, extras, grads = accumulate.loss_and_grads(
        apply_fn, compute_loss, state.params, batch, dropout_key, steps=accum_steps,
        mode=accum_mode, constrain=constrain)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    # A NaN/Inf anywhere in the gradients or the new parameters makes its global norm
    # non-finite, so three scalars cover every leaf. The parameters are checked too: a finite
    # but huge update can overflow them, and the next checkpoint would hold them.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    if nonfinite == "skip":
      keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      params = jax.tree.map(keep_old, params, state.params)
      opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    bad = jnp.logical_not(finite).astype(jnp.int32)
    count = state.nonfinite_steps + bad
    ema_params = state.ema_params
    if ema_decay > 0:
      # n = updates applied before this one; a rejected update leaves the average alone.
      d = ema_decay_at(ema_decay, state.step - state.nonfinite_steps)
      if nonfinite == "skip":
        d = jnp.where(finite, d, 1.0)
      ema_params = optax.incremental_update(params, state.ema_params, 1.0 - d)
    # optax counts applied updates only, so after skipped steps its schedule lags the step.
    lr = schedule(state.step - state.nonfinite_steps)
    metrics = dict(metrics, loss=loss, lr=lr, t=extras["t"], b=extras["b"],
                   grad_norm=grad_norm, param_norm=param_norm, nonfinite=bad,
                   nonfinite_steps=count)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         nonfinite_steps=count, ema_params=ema_params), metrics

  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
