"""Data versions and schedules that switch between them during training.

`config.data_version` names one version or a schedule:
  'baseline'                       the training split as built;
  'balanced'                       M4 with `config.balance` (keep mask, or repeat counts);
  'balanced_proxies'               M4 with `config.balance` plus the proxy constraints;
  'baseline->balanced@10%'         baseline for the first 10 % of the steps, then balanced;
  'balanced->baseline@90%'         any number of '->VERSION@WHEN' segments; WHEN is a duration
                                   (steps, '5000ex', '1ep', '10%'; see config/durations.py).
Every version streams forever, so a run sees the same number of examples whatever its data:
the smaller balanced sets are simply repeated more often.
"""
from __future__ import annotations

import copy
from typing import Iterator, Mapping

import numpy as np

from siglip_fair.config.durations import to_steps

VERSIONS = ("baseline", "balanced", "balanced_proxies")


def parse_schedule(spec: str) -> list[tuple[str, str | None]]:
  """'A->B@10%' -> [('A', None), ('B', '10%')]: each version and when it starts."""
  parts = [p.strip() for p in str(spec).split("->")]
  out = []
  for i, part in enumerate(parts):
    version, _, when = part.partition("@")
    version, when = version.strip(), when.strip() or None
    if version not in VERSIONS:
      raise ValueError(f"data_version={spec!r}: unknown version {version!r}; use one of "
                       f"{VERSIONS}, or a schedule like 'baseline->balanced@10%'.")
    if (i == 0) != (when is None):
      raise ValueError(f"data_version={spec!r}: the first version starts at step 0 and takes no "
                       "'@WHEN'; every later one needs one, e.g. 'baseline->balanced@10%'.")
    out.append((version, when))
  return out


def schedule_steps(spec: str, *, batch_size: int, total_steps: int,
                   num_examples: int | None = None) -> list[tuple[str, int]]:
  """[(version, first step)] with first steps 0 <= s1 <= s2 ... <= total_steps.

  Step s here is the 0-based index of the batch, i.e. version v trains optimiser steps
  start_v + 1 ... start_next.
  """
  out, previous = [], 0
  for version, when in parse_schedule(spec):
    start = 0 if when is None else to_steps(when, batch_size=batch_size, total_steps=total_steps,
                                            num_examples=num_examples, name="data_version")
    if start < previous or start > total_steps:
      raise ValueError(f"data_version={spec!r}: switch points must be increasing and within "
                       f"the {total_steps} training steps; {when!r} is step {start}.")
    out.append((version, start))
    previous = start
  return out


def switch_steps(spec: str, *, batch_size: int, total_steps: int,
                 num_examples: int | None = None) -> tuple[int, ...]:
  """The steps at which `spec` switches to a new version (empty for a single version); the
  optimiser re-warms up there with optim.rewarmup (train/optim.py)."""
  return tuple(start for _, start in schedule_steps(
      spec, batch_size=batch_size, total_steps=total_steps, num_examples=num_examples)[1:])


class ScheduledIterator:
  """Batches of one data version after another, switching at fixed batch indices.

  Each batch carries `data_version` (the version's name) for the metrics. The state, a
  JSON-serialisable dict, holds the batch index and every version's own iterator state, so a
  resumed run switches at the same step and continues each version where it stopped.

  Args:
    iterators: version -> iterator of batches (dicts) with get_state()/set_state().
    schedule: from `schedule_steps`.
  """

  def __init__(self, iterators: Mapping[str, Iterator], schedule: list[tuple[str, int]]):
    missing = {v for v, _ in schedule} - set(iterators)
    if missing:
      raise ValueError(f"ScheduledIterator: no iterator for versions {sorted(missing)}.")
    self._iterators = dict(iterators)
    self._schedule = list(schedule)
    self._index = 0

  def version_at(self, index: int) -> str:
    """The version that supplies batch `index` (0-based)."""
    current = self._schedule[0][0]
    for version, start in self._schedule:
      if index >= start:
        current = version
    return current

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    version = self.version_at(self._index)
    batch = dict(next(self._iterators[version]))
    self._index += 1
    batch["data_version"] = np.asarray(version)
    return batch

  def get_state(self) -> dict:
    return {"index": self._index,
            "iterators": {v: copy.deepcopy(it.get_state()) for v, it in self._iterators.items()}}

  def set_state(self, state: dict) -> None:
    if set(state.get("iterators", {})) != set(self._iterators):
      raise ValueError(
          f"the checkpointed data schedule has versions {sorted(state.get('iterators', {}))} "
          f"but this run's has {sorted(self._iterators)}; resume with the same data_version.")
    for version, it in self._iterators.items():
      it.set_state(state["iterators"][version])
    self._index = int(state["index"])
