"""The balance stage's outputs on disk, content-addressed.

`<balance_dir>/` holds annotations.npz, card.json, card.md, card.png, m4.npz and, written last,
fingerprint.json: what the outputs were computed from (the training data's identity, the
`annotate` and `balance` config subtrees, the annotation shards' identities, the format
version). A rerun reuses the folder only when the fingerprint matches exactly; otherwise the
stage is recomputed in a staging folder beside it and swapped in, and one line says why. So a
balance with another budget, a world with another seed or re-written annotation shards never
reuse a stale keep mask, and a failed recompute leaves the old outputs as they were.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from siglip_fair import fingerprint

FORMAT_VERSION = 1
# The completion marker: outputs without it (an older version, a killed run) are recomputed.
MARKER = fingerprint.FILENAME
# balance fields that change what M4 writes whether or not it is written, never its values.
_NOT_INPUTS = ("allow_infeasible",)


def wanted(config, data_identity: dict) -> dict:
  """The fingerprint a balance output of `config` on data `data_identity` must carry."""
  from siglip_fair import __version__
  balance = fingerprint.plain(config.balance)
  for key in _NOT_INPUTS:
    balance.pop(key, None)
  annotate = fingerprint.plain(config.annotate)
  if annotate.get("image") == "zeroshot" and annotate.get("source") in ("combined", "image"):
    ckpt = (annotate.get("zeroshot") or {}).get("checkpoint") or ""
    annotate["checkpoint_files"] = (fingerprint.file_identity(os.path.join(ckpt, "checkpoints"))
                                    if os.path.isdir(os.path.join(ckpt, "checkpoints")) else ckpt)
  source = config.get("annotations_dir") or ""
  return {
      "stage": "balance", "format": FORMAT_VERSION, "package": __version__,
      "data": data_identity,
      # Shards replace the annotation step: its config then plays no part.
      "annotate": (fingerprint.file_identity(source) if source and os.path.exists(source)
                   else annotate if not source else source),
      "balance": balance,
  }


def status(out: str, want: dict) -> tuple[bool, list[str]]:
  """(reusable, differences): whether `out` holds complete outputs made from `want`."""
  if not os.path.exists(os.path.join(out, "m4.npz")):
    return False, []
  diffs = fingerprint.compare(fingerprint.read(out), want)
  return not diffs, diffs


def _host() -> str:
  return socket.gethostname().replace(".", "_")


def remove_dead_staging(parent: str) -> None:
  """Staging folders left by balance runs of this host that were killed (SIGKILL skips the
  clean-up); those of live processes, e.g. parallel sweep runs, stay."""
  host = _host()
  for name in os.listdir(parent):
    parts = name.split(".")
    if name.startswith(".tmp_balance.") and len(parts) >= 5 and parts[2] == host:
      try:
        os.kill(int(parts[3]), 0)
      except ProcessLookupError:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      except (ValueError, PermissionError):
        pass  # not a pid of ours, or alive under another user


def staged(out: str, want: dict, compute) -> Any:
  """Runs `compute(staging_folder)`, which writes the stage's files there, then moves them into
  `out` with fingerprint.json last. Until that last rename `out` has no valid marker, so a kill
  part-way leaves a folder the next run recomputes; an exception leaves `out` untouched.
  Returns what `compute` returned."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  remove_dead_staging(parent)
  staging = tempfile.mkdtemp(prefix=f".tmp_balance.{_host()}.{os.getpid()}.", dir=parent)
  try:
    result = compute(staging)
    fingerprint.write(staging, want)
    os.makedirs(out, exist_ok=True)
    try:
      os.remove(os.path.join(out, MARKER))  # invalid from here until the new one lands
    except FileNotFoundError:
      pass
    names = sorted(os.listdir(staging), key=lambda f: (f == MARKER, f == "m4.npz"))
    if "annotations.npz" not in names:  # from shards: an older in-memory run's file is stale
      try:
        os.remove(os.path.join(out, "annotations.npz"))
      except FileNotFoundError:
        pass
    for name in names:
      os.replace(os.path.join(staging, name), os.path.join(out, name))
    return result
  finally:
    shutil.rmtree(staging, ignore_errors=True)
