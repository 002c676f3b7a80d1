"""Fingerprints of stage outputs: what each output was computed from, so a rerun reuses it only
when everything it depends on is unchanged.

A fingerprint is a JSON-able dict of named parts (the config subtree a stage reads, the
identities of its input files, the stage's format version, the package version). It is stored
as `fingerprint.json` beside the output, written last. `compare(stored, wanted)` names every
part that differs, down to the config field ("balance.eta 0.65 -> 0.9"), so the line that says
why a stage is recomputed (or why a resume is refused) points at the cause.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

from siglip_fair.io import atomic_write

FILENAME = "fingerprint.json"

# Fields that change how a run is shown or where its files go, never what it computes: a rerun
# that changes only these reuses (or resumes) what is there.
PRESENTATION_FIELDS = ("progress", "tensorboard", "data_dir", "balance_dir", "keep_ckpts",
                       "peak_flops", "log_every", "ckpt_every", "eval_batch_size")


def plain(value: Any) -> Any:
  """`value` as plain JSON types (ConfigDicts and tuples included), keys sorted on dump."""
  if hasattr(value, "to_json_best_effort"):
    return json.loads(value.to_json_best_effort())
  return json.loads(json.dumps(value, default=str))


def digest(value: Any, length: int = 16) -> str:
  """A short stable hash of `value` (canonical JSON)."""
  text = json.dumps(plain(value), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def file_identity(path: str) -> dict:
  """Identity of an input file or folder (every file below it): path, size, mtime."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    return {"path": path, "files": {os.path.relpath(f, path): _stat(f) for f in files}}
  return {"path": path, **_stat(path)}


def _stat(path: str) -> dict:
  st = os.stat(path)
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read(folder: str, filename: str = FILENAME) -> dict | None:
  """The fingerprint stored in `folder`, or None (none recorded, or unreadable)."""
  try:
    with open(os.path.join(folder, filename), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write(folder: str, fingerprint: Mapping) -> str:
  return atomic_write(os.path.join(folder, FILENAME),
                      json.dumps(plain(fingerprint), indent=1, sort_keys=True))


def compare(stored: Mapping | None, wanted: Mapping, *, limit: int = 4) -> list[str]:
  """Human-readable differences between two fingerprints ([] when equal), at most `limit`
  (then '... and N more')."""
  if stored is None:
    return ["no fingerprint recorded (made by an older version or by hand)"]
  diffs = _diff(plain(stored), plain(wanted), "")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


def _diff(a: Any, b: Any, where: str) -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      name = f"{where}.{key}" if where else str(key)
      if key not in a:
        out.append(f"{name} added ({_short(b[key])})")
      elif key not in b:
        out.append(f"{name} removed (was {_short(a[key])})")
      else:
        out += _diff(a[key], b[key], name)
    return out
  return [] if a == b else [f"{where} {_short(a)} -> {_short(b)}"]


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 60 else text[:57] + "..."


def run_config(config) -> dict:
  """The part of a run's config that determines its results (presentation fields removed)."""
  out = plain(config)
  for key in PRESENTATION_FIELDS:
    out.pop(key, None)
  return out
