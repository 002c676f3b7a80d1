"""Optimiser: linear warm-up + cosine decay, global-norm clipping, masked weight decay.

config.optim = dict(
    name='adamw',        # 'adamw' | 'sgd' | 'adafactor'
    lr=1e-3,             # peak learning rate
    wd=1e-4,             # weight decay (optax convention: multiplied by the scheduled lr)
    b1=0.9, b2=0.95,     # adam moments (SigLIP uses b2=0.95 for stability); sgd uses b1 as momentum
    eps=1e-8,
    clip_norm=1.0,       # global gradient-norm clip; None or 0 disables
    end_lr_frac=0.0,     # final lr as a fraction of the peak
    wd_params=r'(.*/)?(kernel|embedding)$',  # regex over parameter paths that get decay
)
"""
from __future__ import annotations

import re

import jax
import optax

from siglip_fair.train.state import tree_names

# Decay only weight matrices and token embeddings: never biases, norm scales, position
# embeddings, pooling probes, or the temperature / bias scalars.
DEFAULT_WD_PARAMS = r"(.*/)?(kernel|embedding)$"


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                  end_lr_frac: float = 0.0) -> optax.Schedule:
  """lr(step): 0 -> peak linearly over `warmup_steps`, then cosine to end_lr_frac * peak."""
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"need total_steps > 0 and 0 <= warmup_steps <= total_steps; got "
        f"total_steps={total_steps}, warmup_steps={warmup_steps}.")
  warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
  decay = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1),
                                      alpha=end_lr_frac)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params, pattern: str = DEFAULT_WD_PARAMS):
  """Bool pytree like `params`: True where weight decay applies (path matches `pattern`)."""
  regex = re.compile(pattern)
  return jax.tree.map(lambda name: bool(regex.fullmatch(name)), tree_names(params))


def make_optimizer(config, total_steps: int, warmup_steps: int):
  """Builds the optax transformation from `config.optim`.

  Returns:
    (tx, schedule): the GradientTransformation and the lr schedule (for logging).
  """
  name = config.get("name", "adamw")
  lr = config.get("lr")
  if lr is None or lr <= 0:
    raise ValueError(f"config.optim.lr must be a positive learning rate, got {lr!r}.")
  schedule = make_schedule(lr, total_steps, warmup_steps, config.get("end_lr_frac", 0.0))
  wd = config.get("wd", 0.0)
  pattern = config.get("wd_params", DEFAULT_WD_PARAMS)
  mask = lambda params: decay_mask(params, pattern)  # noqa: E731
  if name == "adamw":
    tx = optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                     eps=config.get("eps", 1e-8), weight_decay=wd, mask=mask)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd, mask),
                     optax.sgd(schedule, momentum=config.get("b1", 0.9) or None))
  elif name == "adafactor":
    tx = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask)
  else:
    raise ValueError(f"config.optim.name={name!r}; use 'adamw', 'sgd' or 'adafactor'.")
  clip = config.get("clip_norm", 1.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
