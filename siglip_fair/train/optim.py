"""Optimiser: warm-up + a decay schedule, global-norm clipping, masked weight decay.

config.optim = dict(
    name='adamw',        # 'adamw' | 'sgd' | 'adafactor'
    lr=1e-3,             # peak learning rate
    wd=1e-4,             # weight decay (optax convention: multiplied by the scheduled lr)
    b1=0.9, b2=0.95,     # adam moments (SigLIP uses b2=0.95 for stability); sgd uses b1 as momentum
    eps=1e-8,
    clip_norm=1.0,       # global gradient-norm clip; None or 0 disables
    schedule='cosine',   # 'cosine' | 'rsqrt' | 'constant', after the linear warm-up
    end_lr_frac=0.0,     # final lr of 'cosine' as a fraction of the peak
    timescale='10000',   # 'rsqrt': the lr halves after 3 timescales of decay (a duration)
    cooldown='0',        # linear cooldown to 0 over the last steps, any schedule (a duration)
    rewarmup='0',        # re-warm-up at each switch of a `data_version` schedule (a duration)
    wd_params=r'(.*/)?(kernel|embedding)$',  # regex over parameter paths that get decay
)

Durations (`timescale`, `cooldown`, `rewarmup`) take what `config.warmup` takes: steps (300,
'300'), examples ('5000ex'), epochs ('2ep') or percent of training ('10%'); '0' or '' is off.
They are strings in the shipped config so that `--config.optim.rewarmup=10%` type-checks.

The schedule, with t the optimiser's update count (0-based: update t trains on batch t), T the
total steps, P the peak lr. Training is cut into segments: the first starts at a = 0 with warm-up
w = `config.warmup`; with `rewarmup` R > 0, a new one starts at every data switch s of
`config.data_version` (versions.schedule_steps; 0 < s < T), with w = min(R, T - s). Inside the
segment starting at a, with u = t - a and n = T - a (the steps left), big_vision-style:

  u < w:        P * u / w                                (lr 0 on the segment's first update)
  'cosine':     P * (f + (1 - f) * (1 + cos(pi * min(u - w, d) / d)) / 2),  d = max(n - w, 1),
                f = end_lr_frac (optax's linear warm-up joined to its cosine decay)
  'rsqrt':      P / sqrt(1 + (u - w) / timescale)       (big_vision's decay_type='rsqrt', shift 0)
  'constant':   P

so a re-warm-up restarts the whole shape from 0, to the peak, then decays to the end of training.
With `cooldown` C > 0 the lr is then multiplied by clip((T - t) / C, 0, 1): linear to 0 at t = T,
as big_vision's cooldown_steps; warm-up + cooldown must fit in T. Defaults (cosine, no cooldown,
no re-warm-up) give exactly the schedule of earlier versions. Under config.nonfinite='skip' the
count lags the data step by the skipped updates, so a re-warm-up starts that much later.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from siglip_fair.config.durations import to_steps
from siglip_fair.train.state import tree_names

# Decay only weight matrices and token embeddings: never biases, norm scales, position
# embeddings, pooling probes, or the temperature / bias scalars.
DEFAULT_WD_PARAMS = r"(.*/)?(kernel|embedding)$"
SCHEDULES = ("cosine", "rsqrt", "constant")
DEFAULT_TIMESCALE = 10_000  # big_vision's


def _segment(kind: str, peak_lr: float, steps: int, warmup: int, end_lr_frac: float,
             timescale: int) -> optax.Schedule:
  """One warm-up + decay over `steps` steps, as a function of the steps since its start."""
  warm = optax.linear_schedule(0.0, peak_lr, max(warmup, 1))
  if kind == "cosine":  # built as always, so the default schedule stays bit for bit the same
    decay = optax.cosine_decay_schedule(peak_lr, max(steps - warmup, 1), alpha=end_lr_frac)
  elif kind == "rsqrt":
    # join_schedules evaluates both sides: clamp so the warm-up side stays finite.
    decay = lambda u: peak_lr / jnp.sqrt(1.0 + jnp.maximum(u, 0) / timescale)  # noqa: E731
  else:
    decay = optax.constant_schedule(peak_lr)
  return optax.join_schedules([warm, decay], [warmup])


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                  end_lr_frac: float = 0.0, *, kind: str = "cosine", cooldown_steps: int = 0,
                  timescale: int = DEFAULT_TIMESCALE, restarts: Sequence[int] = (),
                  rewarmup_steps: int = 0) -> optax.Schedule:
  """The learning rate per update count (the module docstring gives the formula).

  Args:
    peak_lr: P, the lr reached at the end of every warm-up.
    total_steps: T, training steps (> 0).
    warmup_steps: linear warm-up from 0 at the start, 0 <= warmup_steps <= T.
    end_lr_frac: final lr of 'cosine' as a fraction of the peak.
    kind: 'cosine' | 'rsqrt' | 'constant', the shape after each warm-up.
    cooldown_steps: C >= 0; the lr falls linearly to 0 over the last C steps (0 = none).
    timescale: 'rsqrt' decay timescale in steps (> 0).
    restarts: steps at which the schedule restarts with a re-warm-up (data switches); those
      outside 0 < s < T are ignored.
    rewarmup_steps: warm-up length at each restart; 0 turns restarts off.

  Returns:
    A jit-safe optax.Schedule: scalar (traced) int step -> float32 lr, shape [].
  """
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"need total_steps > 0 and 0 <= warmup_steps <= total_steps; got "
        f"total_steps={total_steps}, warmup_steps={warmup_steps}.")
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} is unknown; use one of {', '.join(SCHEDULES)}, "
                     "e.g. --config.optim.schedule=rsqrt.")
  if cooldown_steps < 0 or warmup_steps + cooldown_steps > total_steps:
    raise ValueError(
        f"optim.cooldown is {cooldown_steps} steps; it must be >= 0 and fit after the "
        f"{warmup_steps} warm-up steps in the {total_steps} training steps: lower "
        "--config.optim.cooldown (or --config.warmup).")
  if timescale <= 0:
    raise ValueError(f"optim.timescale={timescale} steps; 'rsqrt' needs a positive timescale, "
                     "e.g. --config.optim.timescale=10000 (big_vision's).")
  if rewarmup_steps < 0:
    raise ValueError(f"optim.rewarmup={rewarmup_steps} steps must be >= 0 (0 = off).")
  if end_lr_frac and kind != "cosine":
    raise ValueError(f"optim.end_lr_frac={end_lr_frac} only applies to schedule='cosine'; "
                     f"set it to 0 for schedule={kind!r} (use optim.cooldown to end at 0).")
  starts = sorted({int(s) for s in restarts if 0 < s < total_steps}) if rewarmup_steps else []
  segments = [_segment(kind, peak_lr, total_steps, warmup_steps, end_lr_frac, timescale)]
  segments += [_segment(kind, peak_lr, total_steps - s, min(rewarmup_steps, total_steps - s),
                        end_lr_frac, timescale) for s in starts]
  schedule = segments[0] if not starts else optax.join_schedules(segments, starts)
  if not cooldown_steps:
    return schedule

  def with_cooldown(step):
    left = (total_steps - jnp.asarray(step, jnp.float32)) / cooldown_steps
    return schedule(step) * jnp.clip(left, 0.0, 1.0)

  return with_cooldown


def _duration(value, field: str, *, total_steps: int, batch_size: int | None,
              num_examples: int | None) -> int:
  """The duration `value` of optim.<field> in steps; '' and None mean 0."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return 0
  name = f"optim.{field}"
  if batch_size is None:
    if re.search(r"(ex|ep)\s*$", str(value), re.I):
      raise ValueError(f"{name}={value!r} is in examples or epochs: pass make_optimizer "
                       "batch_size= (and num_examples= for epochs) to convert it to steps.")
    batch_size = 1  # steps and percentages do not depend on it
  return to_steps(value, batch_size=batch_size, total_steps=total_steps,
                  num_examples=num_examples, name=name)


def schedule_from_config(config, total_steps: int, warmup_steps: int,
                         switch_steps: Sequence[int] = (), *, batch_size: int | None = None,
                         num_examples: int | None = None) -> optax.Schedule:
  """`make_schedule` with the fields of `config.optim` (durations resolved here)."""
  lr = config.get("lr")
  if lr is None or lr <= 0:
    raise ValueError(f"config.optim.lr must be a positive learning rate, got {lr!r}.")
  kind = config.get("schedule", "cosine")
  # Literal reads, so that tests/test_docs.py checks them against the shipped config.
  raw = {"cooldown": config.get("cooldown", "0"), "rewarmup": config.get("rewarmup", "0"),
         "timescale": config.get("timescale", "10000")}
  steps = {field: _duration(value, field, total_steps=total_steps, batch_size=batch_size,
                            num_examples=num_examples) for field, value in raw.items()}
  return make_schedule(lr, total_steps, warmup_steps, config.get("end_lr_frac", 0.0),
                       kind=kind, cooldown_steps=steps["cooldown"],
                       timescale=steps["timescale"], restarts=switch_steps,
                       rewarmup_steps=steps["rewarmup"])


def decay_mask(params, pattern: str = DEFAULT_WD_PARAMS):
  """Bool pytree like `params`: True where weight decay applies (path matches `pattern`)."""
  regex = re.compile(pattern)
  return jax.tree.map(lambda name: bool(regex.fullmatch(name)), tree_names(params))


def make_optimizer(config, total_steps: int, warmup_steps: int,
                   switch_steps: Sequence[int] = (), *, batch_size: int | None = None,
                   num_examples: int | None = None):
  """Builds the optax transformation from `config.optim`.

  Args:
    config: the `config.optim` group (fields in the module docstring).
    total_steps: training steps.
    warmup_steps: the initial warm-up, in steps.
    switch_steps: steps at which the data version switches (`versions.switch_steps`); the
      schedule re-warms up there when optim.rewarmup > 0.
    batch_size: global batch size, to convert durations given in examples or epochs.
    num_examples: training-set size, for durations in epochs.

  Returns:
    (tx, schedule): the GradientTransformation and the lr schedule (for logging).
  """
  name = config.get("name", "adamw")
  schedule = schedule_from_config(config, total_steps, warmup_steps, switch_steps,
                                  batch_size=batch_size, num_examples=num_examples)
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
