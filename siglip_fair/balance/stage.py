"""The balance stage's outputs on disk, content-addressed.

`<balance_dir>/` holds annotations.npz, card.json, card.md, card.png, m4.npz and, written last,
fingerprint.json: what the outputs were computed from (the training data's identity, the
`annotate` and `balance` config subtrees, the annotation shards' identities, the format
version). A rerun reuses the folder only when the fingerprint matches exactly; otherwise the
stage is recomputed in a staging folder beside it and swapped in, and one line says why. So a
balance with another budget, a world with another seed or re-written annotation shards never
reuse a stale keep mask, and a failed recompute leaves the old outputs as they were.

Under `jax.distributed` (several processes, one shared file system) process 0 alone decides
whether to reuse (`agree`), owns the staging folder and writes the outputs; the others compute
their rows and hand them over as part files in that folder (`gather_rows`).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

import jax
import numpy as np

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


def _new_staging(out: str) -> str:
  """A fresh staging folder beside `out` (same file system, so publishing is a rename), after
  removing those that dead processes left there."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  remove_dead_staging(parent)
  return tempfile.mkdtemp(prefix=f".tmp_balance.{_host()}.{os.getpid()}.", dir=parent)


def staged(out: str, want: dict, compute) -> Any:
  """Runs `compute(staging_folder)`, which writes the stage's files there, then moves them into
  `out` with fingerprint.json last. Until that last rename `out` has no valid marker, so a kill
  part-way leaves a folder the next run recomputes; an exception leaves `out` untouched.
  Returns what `compute` returned.

  With several processes every process calls it: `compute` runs on all of them with process 0's
  staging folder (the others may write only part files there, see `gather_rows`), process 0
  alone moves the files into `out`, and no process returns before they are all there."""
  if jax.process_count() > 1:
    return _staged_multiprocess(out, want, compute)
  staging = _new_staging(out)
  try:
    result = compute(staging)
    _publish(staging, out, want)
    return result
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: str, out: str, want: dict) -> None:
  """Moves the staged files into `out`, fingerprint.json last."""
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


# ------------------------------------------------------------------ several processes

_PATH_BYTES = 4096  # broadcasts need one shape everywhere: paths travel NUL-padded


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (itself with one process). The reuse decision goes
  through here, so no process starts writing while another decides to reuse."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def _share_path(path: str | None) -> str:
  """Process 0's `path` on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = (path or "").encode()
  if len(raw) >= _PATH_BYTES:
    raise ValueError(f"balance staging path {path!r} is longer than {_PATH_BYTES - 1} bytes; "
                     "use a shorter balance_dir.")
  buf = np.frombuffer(raw.ljust(_PATH_BYTES, b"\0"), np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return got.tobytes().rstrip(b"\0").decode()


def _all_see(folder: str) -> None:
  """Raises on every process (never on some only, which would leave the others waiting) unless
  every process sees process 0's `folder`: the processes must share a file system."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  seen = np.asarray(multihost_utils.process_allgather(np.int32(os.path.isdir(folder))))
  if not seen.all():
    raise ValueError(
        f"processes {np.flatnonzero(seen == 0).tolist()} do not see process 0's balance staging "
        f"folder {folder!r}: a multi-process balance needs balance_dir (default "
        "<workdir>/balance) on a file system every process shares (NFS, GCS FUSE, Filestore).")


def _staged_multiprocess(out: str, want: dict, compute) -> Any:
  lead = jax.process_index() == 0
  staging = _new_staging(out) if lead else None
  try:
    staging = _share_path(staging)
    _all_see(staging)
    result = compute(staging)
    if lead:
      _publish(staging, out, want)
  finally:
    if lead:
      shutil.rmtree(staging, ignore_errors=True)
  _barrier("balance: outputs published")  # no process reads `out` before process 0 wrote it
  return result


def _runs(rows: np.ndarray) -> np.ndarray:
  """[k, 2] (start, length) of the consecutive runs of `rows`: a process's rows are whole
  shards, so k is its shard count and the part file stays 5 bytes a row, not 13."""
  rows = np.asarray(rows, np.int64)
  if rows.size == 0:
    return np.zeros((0, 2), np.int64)
  cut = np.flatnonzero(np.diff(rows) != 1) + 1
  starts = np.concatenate([[0], cut])
  stops = np.concatenate([cut, [rows.size]])
  return np.stack([rows[starts], stops - starts], axis=1)


def gather_rows(staging: str, arrays: dict[str, np.ndarray], rows: np.ndarray,
                n: int) -> dict[str, np.ndarray] | None:
  """Every process's rows of `arrays` ({name: [n_local]}) in global order on process 0
  ({name: [n]}); None on the others. Call on every process with the staging folder of `staged`.

  Each process writes its rows to a part file in `<staging>/.parts/` and process 0 merges them
  after a barrier, one part at a time. Why files and not `multihost_utils.process_allgather`:
  an all-gather leaves all N rows on every host (and passes them through device memory), while
  only process 0 writes m4.npz; with files process 0 holds the N rows once plus one part, the
  others only their own rows, which is what scales to 10^8-10^9 rows. The processes already
  share the file system the outputs go to (`_all_see`).
  """
  lead = jax.process_index() == 0
  parts = os.path.join(staging, ".parts")
  if lead:
    os.makedirs(parts, exist_ok=True)
  _barrier("balance: parts folder made")
  name = os.path.join(parts, f"part-{jax.process_index():05d}.npz")
  with open(name + ".tmp", "wb") as f:  # np.savez straight to disk: no second copy in memory
    np.savez(f, runs=_runs(rows), **arrays)
  os.replace(name + ".tmp", name)
  _barrier("balance: parts written")
  if not lead:
    return None
  merged, covered = None, np.zeros(n, bool)
  for p in range(jax.process_count()):
    with np.load(os.path.join(parts, f"part-{p:05d}.npz"), allow_pickle=False) as f:
      part = {k: f[k] for k in f.files}
    if merged is None:
      merged = {k: np.empty(n, part[k].dtype) for k in arrays}
    offset = 0
    for start, length in part["runs"]:
      if covered[start:start + length].any() or start + length > n:
        raise ValueError(f"balance: process {p}'s rows [{start}, {start + length}) overlap "
                         f"another process's or pass the {n} rows; the processes disagree on "
                         "the annotation shards (same annotations_dir on every process?).")
      covered[start:start + length] = True
      for k in arrays:
        merged[k][start:start + length] = part[k][offset:offset + length]
      offset += length
  if not covered.all():
    raise ValueError(f"balance: the processes' parts miss {int((~covered).sum())} of {n} rows.")
  shutil.rmtree(parts)
  return merged
