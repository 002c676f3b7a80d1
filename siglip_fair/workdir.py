"""Run folders (--workdir): checked before anything is built, and locked while a command runs.

Two commands writing the same workdir at once (a rerun started while the first still trains, a
sweep launched twice) interleave checkpoints and metrics. `lock` holds an exclusive
`fcntl.flock` on `<workdir>/.lock` for as long as a command runs; a second command fails at once
with `WorkdirBusy`, naming the holder. The kernel drops the lock when its process ends, however
it ends (SIGKILL included), so a lock is never stale; the file stays, holding the last holder's
details until the next one overwrites them.

Multi-process JAX jobs share one workdir across hosts: only process 0 takes the lock (pass
`lead=jax.process_index() == 0`), or every process but the first would find it busy.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

LOCK_NAME = ".lock"


class WorkdirBusy(ValueError):
  """Another process holds the workdir's lock; the message names it."""


class WorkdirError(ValueError):
  """A workdir that cannot be used (a file, or not writable); the message says the fix."""


def _holder_text(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace") or "null")
  except ValueError:
    holder = None
  if not isinstance(holder, dict):  # it has the lock but has not written its details yet
    return "another process"
  where = f"pid {holder.get('pid')} on host {holder.get('host')}"
  since = f", since {holder['started']}" if holder.get("started") else ""
  return f"{where} (`{holder.get('command')}`{since})"


@contextlib.contextmanager
def lock(workdir: str, command: str, *, lead: bool = True):
  """Holds `<workdir>/.lock` (creating the workdir) while the block runs.

  Args:
    workdir: the run folder.
    command: what runs, shown to a second command that finds the folder busy (e.g.
      `" ".join(sys.argv)`).
    lead: whether this process takes the lock; pass False on all but process 0 of a
      multi-process job, which then run unlocked.

  Raises:
    WorkdirBusy: another process holds the lock (its pid, host and command are named).
  """
  if not lead:
    yield
    return
  check_usable(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    locked = _try_lock(fd, workdir, path)
    if locked:
      details = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    try:
      yield
    finally:
      if locked:
        # The details go before the lock does, so a reader never sees a finished holder's.
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _try_lock(fd: int, workdir: str, path: str) -> bool:
  """Takes the lock on `fd`: True, or False on a file system without locks (with a warning);
  raises `WorkdirBusy` when another process holds it."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    raise WorkdirBusy(
        f"workdir {workdir} is in use by {_holder_text(fd)}; wait for it to finish, or use "
        "another --workdir.") from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      raise
    # Some network and FUSE file systems have no locks: run, but say it is unguarded.
    print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second command from "
          "writing this workdir at the same time.", file=sys.stderr, flush=True)
    return False


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def _write_error(folder: str) -> OSError | None:
  """Why a file cannot be created in `folder` (None when it can). os.access alone is not
  enough: it says yes to root on read-only mounts and no-permission folders alike."""
  if not os.access(folder, os.W_OK | os.X_OK):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=folder)
  except OSError as e:
    return e
  os.close(fd)
  os.remove(probe)
  return None


def check_usable(workdir: str) -> None:
  """Raises `WorkdirError` when `workdir` cannot hold a run: it (or a folder on its path) is
  a file, or the folder (or, when it does not exist yet, its nearest existing parent) is not
  writable. Writes nothing that stays."""
  existing = _nearest_existing(workdir)
  if not os.path.isdir(existing):
    if existing == os.path.abspath(workdir):
      raise WorkdirError(f"--workdir {workdir} is a file, not a folder; pass a folder path (it "
                         "is created if missing), or move the file away.")
    raise WorkdirError(f"{existing} is a file, but --workdir {workdir} needs it to be a folder; "
                       "pass another --workdir, or move the file away.")
  error = _write_error(existing)
  if error is not None:
    where = (f"--workdir {workdir}" if existing == os.path.abspath(workdir)
             else f"{existing} (the nearest existing folder of --workdir {workdir})")
    raise WorkdirError(f"cannot write in {where}: {error.strerror or error}; make it writable "
                       "for this user (e.g. chmod u+w), or pass another --workdir.")
