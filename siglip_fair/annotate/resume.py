"""What lets an annotation job resume at shard granularity: a fixed cut of the rows into
ranges (one shard file each, `balance.shards.shard_name`) and a settings manifest beside the
shards, so a rerun skips finished shards and never mixes two annotations in one folder.
Used by the Beam text annotation and the multi-host image annotation alike.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
  """[(start, stop)] of the rows [0, n) cut every `shard_size` rows (the last one shorter)."""
  if n < 1:
    raise ValueError(f"the source has {n} rows; nothing to annotate.")
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size} must be >= 1.")
  return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
  return out


def check_settings(path: str, settings: Mapping[str, Any]) -> bool:
  """Whether the manifest `path` holds `settings` (JSON-able, nested); False when absent;
  ValueError naming each setting that differs when it holds others."""
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    found, now = _flat(json.load(f)), _flat(settings)
  diff = sorted(k for k in set(found) | set(now) if found.get(k) != now.get(k))
  if diff:
    raise ValueError(f"{path!r} was written with other settings ({diff} differ): "
                     + "; ".join(f"{k}={found.get(k)!r} there, {now.get(k)!r} now"
                                 for k in diff[:5])
                     + ". Its shards would mix two annotations: use a new output folder, or "
                     "the first run's settings.")
  return True
