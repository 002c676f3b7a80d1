"""Atomic file writes: a reader (or a resumed job) sees the old file or the new one, never half.

Every output of the stack (tokenizer, annotations, keep masks, data cards, summaries, plots)
goes through `atomic_write` / `atomic_savez`: write to a temp file in the same folder, flush,
then `os.replace`, which is atomic on POSIX file systems.
"""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np


def atomic_write(path: str | os.PathLike, data: str | bytes) -> str:
  """Writes `data` (text as UTF-8) to `path` atomically; returns the path."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path) + ".")
  try:
    # mkstemp makes the file owner-only (0600); outputs are meant to be shared like any file.
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def atomic_savez(path: str | os.PathLike, **arrays) -> str:
  """`np.savez` to `path` atomically (load with `np.load(path, allow_pickle=False)`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  return atomic_write(path, buffer.getvalue())
