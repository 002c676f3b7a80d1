"""Durations in steps, examples, epochs or percent of training, converted in one place.

Every duration-like config field (``total``, ``warmup``, ``log_every``, ``ckpt_every``,
``eval_every`` ...) accepts:

* an ``int`` or a digit string: optimiser steps, e.g. ``300`` or ``"300"``;
* ``"<n>ex"``: examples seen, e.g. ``"50000ex"`` (rounded up to whole steps);
* ``"<x>ep"``: epochs over the training set, e.g. ``"2.5ep"`` (needs the data size);
* ``"<p>%"``: percent of the total training steps, e.g. ``"10%"`` (not for ``total``).

Intervals are at least one step, except that ``eval_every`` 0 or ``"never"`` turns periodic
evaluation off and ``ckpt_every`` 0 saves only the final checkpoint (`resolve_steps` gives 0
for both).
"""
from __future__ import annotations

import math
import re

import ml_collections

_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ex|ep|%|steps?)?\s*$", re.I)

# Fields resolved by `resolve_steps`, with the default used when a config leaves one out.
DURATION_FIELDS = {
    "warmup": "0",
    "log_every": "10%",
    "ckpt_every": "25%",
    "eval_every": "50%",
}
# Intervals for which 0 means "off" (`resolve_steps` keeps the 0), and those that also take
# the word 'never'.
ZERO_MEANS_OFF = ("eval_every", "ckpt_every")
NEVER_FIELDS = ("eval_every",)
NEVER = "never"


def _is_never(value) -> bool:
  return isinstance(value, str) and value.strip().lower() == NEVER


def to_steps(value, *, batch_size: int, total_steps: int | None = None,
             num_examples: int | None = None, name: str = "duration") -> int:
  """Converts one duration to a whole number of optimiser steps.

  Args:
    value: int steps, or a string '300' | '5000ex' | '2ep' | '10%'.
    batch_size: global batch size (examples per step).
    total_steps: total training steps, needed for percentages.
    num_examples: training-set size, needed for epochs.
    name: the config field, for error messages.

  Returns:
    Number of steps, >= 0. Non-zero fractional results round up so that a short duration
    never silently becomes 0 steps.
  """
  if batch_size is None or batch_size <= 0:
    raise ValueError(f"{name}: batch_size must be a positive integer, got {batch_size!r}.")
  if isinstance(value, bool):
    raise ValueError(f"{name}: expected a duration like 300, '5000ex', '2ep' or '10%', got {value!r}.")
  if isinstance(value, int):
    number, unit = float(value), "steps"
  else:
    match = _UNIT.match(str(value))
    if not match:
      raise ValueError(
          f"{name}: cannot read duration {value!r}; use steps (300), examples ('5000ex'), "
          "epochs ('2ep') or percent of training ('10%').")
    number, unit = float(match.group(1)), (match.group(2) or "steps").lower()
  if number < 0:
    raise ValueError(f"{name}: duration must be >= 0, got {value!r}.")
  if unit in ("steps", "step"):
    if number != int(number):
      raise ValueError(f"{name}: a step count must be whole, got {value!r}.")
    return int(number)
  if unit == "ex":
    return math.ceil(number / batch_size)
  if unit == "ep":
    if not num_examples:
      raise ValueError(f"{name}: {value!r} is in epochs but the training-set size is unknown.")
    return math.ceil(number * num_examples / batch_size)
  # percent
  if total_steps is None:
    raise ValueError(f"{name}: {value!r} is a percentage, which is only allowed relative to 'total'.")
  return math.ceil(number / 100.0 * total_steps)


def resolve_steps(config: ml_collections.ConfigDict,
                  num_examples: int | None = None) -> ml_collections.ConfigDict:
  """Resolves the training durations of `config` into steps.

  Reads ``config.batch_size``, ``config.total`` (required) and the optional fields of
  `DURATION_FIELDS`. Returns a ConfigDict with ``total_steps``, ``warmup_steps``,
  ``log_every``, ``ckpt_every`` and ``eval_every`` (intervals are at least 1 step, except
  0 for ``eval_every`` 0 or 'never' and ``ckpt_every`` 0: see the module docstring).
  """
  if "total" not in config:
    raise ValueError("config.total is required: training length as steps, 'Nex', 'Nep'.")
  bs = config.get("batch_size")
  if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
    raise ValueError(f"config.batch_size={bs!r} must be a positive integer: the global batch "
                     "(examples per step over all devices), e.g. --config.batch_size=256.")
  total = to_steps(config.total, batch_size=bs, num_examples=num_examples, name="total")
  if total <= 0:
    raise ValueError(f"config.total={config.total!r} gives {total} steps; training needs >= 1: "
                     "set --config.total to steps (1000), examples ('50000ex') or epochs "
                     "('2ep').")
  out = ml_collections.ConfigDict({"total_steps": total})
  for field, default in DURATION_FIELDS.items():
    value = config.get(field, default)
    if field in NEVER_FIELDS and _is_never(value):
      out[field] = 0
      continue
    steps = to_steps(value, batch_size=bs, total_steps=total, num_examples=num_examples,
                     name=field)
    if field == "warmup":
      out["warmup_steps"] = min(steps, total)
    else:
      out[field] = steps if field in ZERO_MEANS_OFF and steps == 0 else max(1, steps)
  return out


def check_override(field: str, raw, name: str | None = None) -> None:
  """Validates a command-line value for the duration field `field` (e.g. 'eval_every'),
  before the batch size or data size are known; raises ValueError naming `name` (default: the
  field) when it cannot be read. 'never' passes for the fields of `NEVER_FIELDS`."""
  name = name or field
  if field in NEVER_FIELDS and _is_never(raw):
    return
  try:
    # Percentages are relative to `total`, so `total` itself cannot be one.
    to_steps(raw, batch_size=1, total_steps=None if field == "total" else 1, num_examples=1,
             name=name)
  except ValueError as e:
    if _is_never(raw):
      raise ValueError(f"{name}: 'never' is only for {', '.join(NEVER_FIELDS)}; give a "
                       "duration like 300, '5000ex', '2ep' or '10%'.") from None
    raise


def check_durations(config: ml_collections.ConfigDict) -> None:
  """Validates batch_size and every duration before any data exist (so before anything is
  written); epochs are counted as if the training set held one batch, which keeps their sign."""
  resolve_steps(config, num_examples=config.get("batch_size"))
