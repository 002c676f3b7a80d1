"""Workdir lock and checks (siglip_fair/workdir.py), with real processes contending."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from siglip_fair import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Takes the lock, says so, and holds it until its stdin closes (or it is killed).
HOLDER = """
import sys
from siglip_fair import workdir
with workdir.lock(sys.argv[1], "siglip-fair train --workdir held"):
  print("locked", flush=True)
  sys.stdin.read()
"""
# Tries the lock once: exit 3 with the message when busy, 0 when it got it.
CONTENDER = """
import sys
from siglip_fair import workdir
try:
  with workdir.lock(sys.argv[1], "second"):
    pass
except workdir.WorkdirBusy as e:
  print(e)
  sys.exit(3)
"""


def _raising(code, text=None):
  """A stand-in for a system call that fails with errno `code`."""
  def fail(*args, **kwargs):
    del args, kwargs
    raise OSError(code, text or os.strerror(code))
  return fail


def _python(code, *args, **kwargs):
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), **kwargs)


def _contend(workdir):
  proc = _python(CONTENDER, workdir, stdout=subprocess.PIPE)
  out, _ = proc.communicate(timeout=120)  # a hang guard only
  return proc.returncode, out.strip()


@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_a_second_process_is_refused_until_the_holder_ends(tmp_path, end):
  workdir = str(tmp_path / "run")
  holder = _python(HOLDER, workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with open(os.path.join(workdir, ".lock")) as f:
      details = json.load(f)
    assert details["pid"] == holder.pid and details["host"] == socket.gethostname()
    assert details["command"] == "siglip-fair train --workdir held" and details["started"]
    code, message = _contend(workdir)
    assert code == 3, message  # refused at once, not waiting
    assert message.startswith(f"workdir {workdir} is in use by pid {holder.pid} on host "
                              f"{socket.gethostname()} (`siglip-fair train --workdir held`")
    assert "wait for it to finish, or use another --workdir" in message
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {holder.pid}"):
      with workdir_lib.lock(workdir, "third"):  # in this process too
        pass
  finally:
    if end == "SIGKILL":
      holder.kill()  # no clean-up runs: the kernel drops the lock
    holder.stdin.close()
    holder.wait(timeout=120)
  assert holder.returncode == (-signal.SIGKILL if end == "SIGKILL" else 0)
  assert _contend(workdir) == (0, "")
  with workdir_lib.lock(workdir, "mine"):
    with open(os.path.join(workdir, ".lock")) as f:
      assert json.load(f)["pid"] == os.getpid()


def test_lock_on_other_processes_of_a_job_is_a_no_op(tmp_path):
  with workdir_lib.lock(str(tmp_path), "process 0"):
    with workdir_lib.lock(str(tmp_path), "process 1", lead=False):
      pass  # not process 0: shares process 0's lock instead of contending for it


def test_check_usable_rejects_a_file(tmp_path):
  path = tmp_path / "results.json"
  path.write_text("{}")
  with pytest.raises(workdir_lib.WorkdirError,
                     match=re.escape(f"--workdir {path} is a file, not a folder")):
    workdir_lib.check_usable(str(path))
  with pytest.raises(ValueError, match=re.escape(f"{path} is a file, but --workdir {path}/run")):
    workdir_lib.check_usable(str(path / "run"))
  with pytest.raises(ValueError, match="is a file"):
    with workdir_lib.lock(str(path), "train"):
      pass
  workdir_lib.check_usable(str(tmp_path / "new" / "run"))  # created later: fine
  assert sorted(os.listdir(tmp_path)) == ["results.json"]  # the check leaves nothing


def test_check_usable_rejects_a_folder_it_cannot_write(tmp_path, monkeypatch):
  folder = tmp_path / "ro"
  folder.mkdir()
  if os.geteuid() != 0:  # root writes anyway, so the real case runs for other users only
    folder.chmod(0o555)
    try:
      with pytest.raises(workdir_lib.WorkdirError,
                         match=re.escape(f"cannot write in --workdir {folder}")):
        workdir_lib.check_usable(str(folder))
    finally:
      folder.chmod(0o755)

  # A read-only mount, where os.access says yes (to root, always): the probe file fails.
  monkeypatch.setattr(tempfile, "mkstemp", _raising(errno.EROFS))
  with pytest.raises(workdir_lib.WorkdirError) as raised:
    workdir_lib.check_usable(str(folder / "run"))
  message = str(raised.value)
  assert message.startswith(f"cannot write in {folder} (the nearest existing folder of "
                            f"--workdir {folder / 'run'}): Read-only file system;")
  assert "pass another --workdir" in message
  monkeypatch.setattr(tempfile, "mkstemp", _raising(errno.EACCES))
  with pytest.raises(workdir_lib.WorkdirError, match="Permission denied; make it writable"):
    workdir_lib.check_usable(str(folder))


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                  capsys):
  monkeypatch.setattr(workdir_lib.fcntl, "flock", _raising(errno.ENOLCK))
  ran = []
  with workdir_lib.lock(str(tmp_path), "train"):
    ran.append(True)
  assert ran == [True]
  assert "cannot lock" in capsys.readouterr().err
  monkeypatch.setattr(workdir_lib.fcntl, "flock", _raising(errno.EBADF, "bad"))
  with pytest.raises(OSError, match="bad"):  # other failures are not papered over
    with workdir_lib.lock(str(tmp_path), "train"):
      pass
