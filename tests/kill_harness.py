"""The kill harness's machinery (tests/test_kill_harness.py): fork servers that run victims,
kill points drawn ahead of a victim's progress, and checks that every output left is whole.

The victims are children of a fork server (kill_process.py) that imported the stack once, so a
restart costs its own backend start, restore and (cached) compilation but not ~5 s of imports.
Each kill point is drawn from where the victim stands (its latest checkpoint, the runs it has
finished), so it lies ahead of it: a progress marker this restart writes (a metrics line, a
progress bar, an output file) or start-up, plus a small random delay. The draws come from a
printed seed (KILL_HARNESS_SEED=... reruns with it), and every point is printed with the exit
status of its victim.
"""
import dataclasses
import json
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import jax
import numpy as np
import pytest

from siglip_fair.train import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SERVER = os.path.join(HERE, "kill_process.py")
KILLS = 10  # per (workload, signal), all landing while the victim runs
SEED = int(os.environ.get("KILL_HARNESS_SEED") or random.SystemRandom().randrange(10**6))
PREEMPTED = 143  # 128 + SIGTERM: loop.Preempted, launch/local.py
INTERRUPTED = 130  # 128 + SIGINT: loop.Preempted after Ctrl-C
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# The runs of the sweep victims (test_kill_harness.MICRO_SWEEP); "" is a training workdir itself.
RUNS = ("seed=0", "seed=1")


# ---------------------------------------------------------------- the fork server


class Server:
  """One kill_process.py fork server; it runs one victim at a time."""

  def __init__(self, env):
    self.proc = subprocess.Popen([sys.executable, SERVER, "serve"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    self.lines = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    assert self._next(300) == {"ready": True}
    self.pid, self.code, self.cpu = None, None, 0.0  # cpu: of all victims so far

  def _read(self):
    for line in self.proc.stdout:
      self.lines.put(json.loads(line))
    self.lines.put(None)

  def _next(self, timeout):
    message = self.lines.get(timeout=timeout)
    assert message is not None, "the fork server died"
    return message

  def start(self, workload, args, log):
    self.proc.stdin.write(json.dumps(dict(workload=workload, args=args, log=log)) + "\n")
    self.proc.stdin.flush()
    self.pid, self.code = self._next(60)["pid"], None
    return self.pid

  def _ended(self, message):
    self.code = message["code"]
    self.cpu += message["cpu"]

  def running(self) -> bool:
    if self.code is None:
      try:
        self._ended(self.lines.get_nowait())
      except queue.Empty:
        pass
    return self.code is None

  def wait(self, timeout=600) -> int:
    if self.code is None:
      self._ended(self._next(timeout))
    return self.code

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
  """Two fork servers (one per CPU core); victims get 2 CPU devices and a shared compilation
  cache (identical executables: what changes between runs is only whether XLA reran)."""
  cache = tmp_path_factory.mktemp("jax_cache")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                       "--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  with futures.ThreadPoolExecutor(2) as pool:
    pair = list(pool.map(lambda _: Server(env), range(2)))
  yield pair
  for server in pair:
    server.close()
  # What CI pays: CPU seconds of every victim and server (2 cores run them side by side).
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"kill harness: victims and servers used {children.ru_utime + children.ru_stime:.0f} "
        "CPU seconds")


@pytest.fixture
def cpu(servers):
  """Prints the victims' CPU seconds per server (lane) for the test that uses it."""
  before = [s.cpu for s in servers]
  yield
  print("victim CPU seconds per lane:", [round(s.cpu - b) for s, b in zip(servers, before)])


def _lanes(*jobs):
  """Runs the job lists, one per fork server, side by side; returns their results."""
  with futures.ThreadPoolExecutor(len(jobs)) as pool:
    return [f.result() for f in [pool.submit(lambda js=js: [j() for j in js]) for js in jobs]]


# ---------------------------------------------------------------- kills and checks


@dataclasses.dataclass
class Point:
  """Where to kill: `kind` 'start' (right away), 'step' (once `run`'s metrics.jsonl, rewritten
  by this restart, reaches step `value`), 'log' (once this restart's log holds `value`) or
  'file' (once this restart has written `value`); then wait `delay` seconds."""
  kind: str
  value: object = None
  delay: float = 0.0
  run: str = ""
  parallel: bool = False  # sweep only: this restart runs with --parallel 2 (child processes)

  def __str__(self):
    where = {"start": "start", "step": f"{self.run or 'step'}>={self.value}"}.get(
        self.kind, f"{self.kind}:{self.value}")
    return f"{where}+{self.delay * 1000:.0f}ms" + (" (--parallel 2)" if self.parallel else "")


def _max_step(path) -> int:
  """Largest step of the complete lines of a metrics.jsonl (0 when none)."""
  step = 0
  try:
    with open(path) as f:
      for line in f:
        if line.endswith("\n"):
          step = max(step, json.loads(line)["step"])
  except FileNotFoundError:
    pass
  return step


def _inode(path):
  try:
    return os.stat(path).st_ino
  except FileNotFoundError:
    return None


def _reached(point: Point, workdir, log, started_ns, inodes) -> bool:
  # Lines and files a killed run left behind must not count: a resumed run rewrites its
  # metrics.jsonl (a new inode) before it logs again, and files count once written again.
  if point.kind == "start":
    return True
  if point.kind == "step":
    path = os.path.join(workdir, point.run, "metrics.jsonl")
    inode = _inode(path)
    return inode is not None and inode != inodes.get(path) and _max_step(path) >= point.value
  if point.kind == "file":
    try:
      return os.stat(os.path.join(workdir, point.value)).st_mtime_ns >= started_ns
    except FileNotFoundError:
      return False
  try:
    with open(log, errors="replace") as f:
      return point.value in f.read()
  except FileNotFoundError:  # the child has not opened it yet
    return False


def _children(pid) -> list[int]:
  """Process ids whose parent is `pid` (Linux /proc; none elsewhere)."""
  children = []
  for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  return children


def _dead(pid) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
  except OSError:
    return True


@dataclasses.dataclass
class Kill:
  point: Point
  code: int
  landed: bool  # the signal hit a running victim, which then died of it
  log: str
  started_ns: int  # when the victim started (files older than this are an earlier run's)


def _kill_at(server, workload, args, workdir, point, sig, log, timeout=600) -> Kill:
  """Starts the victim, kills it at `point`, waits for it to end."""
  paths = [os.path.join(workdir, run, "metrics.jsonl") for run in ("", *RUNS)]
  inodes = {path: _inode(path) for path in paths}
  started_ns = time.time_ns()
  pid = server.start(workload, args, log)
  deadline = time.monotonic() + timeout
  while server.running() and not _reached(point, workdir, log, started_ns, inodes):
    assert time.monotonic() < deadline, f"{point} never came; {log}"
    time.sleep(0.01)
  time.sleep(point.delay)
  children = _children(pid)
  hit = server.running()
  if hit:
    os.kill(pid, sig)
  code = server.wait()
  if sig == signal.SIGKILL and children:
    # The launcher's runs die with it (PR_SET_PDEATHSIG): none outlives it to race a restart.
    deadline = time.monotonic() + 60
    while not all(_dead(c) for c in children):
      assert time.monotonic() < deadline, f"child runs {children} outlived the launcher"
      time.sleep(0.05)
  with open(log, errors="replace") as f:
    text = f.read()
  return Kill(point, code, hit and code in (-sig, PREEMPTED), text, started_ns)


def _kill_repeatedly(server, workload, args, workdir, choose, sig, name, check,
                     parallel_args=()):
  """Kills the victim until KILLS kills have landed mid-run, checking its outputs after each,
  then runs it to the end; returns the kills. `choose(rng, workdir, kills)` picks the next
  point from where the victim now stands, so every point lies ahead of it."""
  os.makedirs(workdir, exist_ok=True)
  rng = random.Random(f"{SEED}/{name}")
  kills = []
  while sum(k.landed for k in kills) < KILLS:
    assert len(kills) < 2 * KILLS, (f"{name}: too many kills missed", SEED)
    point = choose(rng, workdir, kills)
    log = os.path.join(workdir, f"victim_{len(kills)}.log")
    extra = list(parallel_args) if point.parallel else []
    kill = _kill_at(server, workload, args + extra, workdir, point, sig, log)
    print(f"{name} kill {len(kills)}: {point} -> exit {kill.code}"
          f"{'' if kill.landed else ' (missed: it had finished)'}", flush=True)
    if kill.landed and sig == signal.SIGTERM:
      # Handled (143, with the message) or, before a handler is installed, the default action.
      assert kill.code in (PREEMPTED, -signal.SIGTERM), (kill, SEED)
      if kill.code == PREEMPTED:
        assert "SIGTERM" in kill.log and "rerun the same command" in kill.log, (kill.log, SEED)
    elif not kill.landed:
      assert kill.code == 0, (kill.log[-3000:], SEED)
    check(workdir, sig, kill)
    kills.append(kill)
  log = os.path.join(workdir, "final.log")
  server.start(workload, args, log)
  code = server.wait()
  with open(log, errors="replace") as f:
    assert code == 0, (f.read()[-3000:], SEED)
  return kills


def _run(server, workload, args, workdir):
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "run.log")
  server.start(workload, args, log)
  code = server.wait()
  with open(log, errors="replace") as f:
    assert code == 0, f.read()[-3000:]


def _check_file(path, clean: bool):
  """Every output file parses completely. `clean`: the victim exited by itself (SIGTERM or
  SIGINT), so even a metrics line cut short would be a bug."""
  name = os.path.basename(path)
  if name.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      for key in f.files:
        f[key]  # pylint: disable=pointless-statement
  elif name.endswith(".json"):
    with open(path) as f:
      json.load(f)
  elif name.endswith(".png"):
    with open(path, "rb") as f:
      assert f.read().endswith(PNG_END), path
  elif name.endswith(".md"):
    with open(path, encoding="utf-8") as f:
      assert f.read().strip(), path
  elif name.endswith(".jsonl"):
    with open(path) as f:
      text = f.read()
    # A SIGKILL may cut the last line short (MetricWriter drops it on resume); none other.
    assert not clean or not text or text.endswith("\n"), path
    for line in text.split("\n")[:-1]:
      json.loads(line)


def check_outputs(root, sig, kill):
  """After a kill: every output under `root` is whole, and the latest checkpoint restores."""
  clean = (sig, kill.code) in ((signal.SIGTERM, PREEMPTED), (signal.SIGINT, INTERRUPTED))
  for folder, dirs, files in os.walk(root):
    # Temp files and staging folders (`.tmp_*`) are never read as outputs. A clean exit
    # removes its own (an earlier kill by the default SIGTERM action may have left some).
    for name in dirs + files:
      if name.startswith(".tmp_") and clean:
        path = os.path.join(folder, name)
        assert os.stat(path).st_mtime_ns < kill.started_ns, f"SIGTERM left {path} behind"
    dirs[:] = [d for d in dirs if d not in ("checkpoints", "tensorboard", "data")
               and not d.startswith(".tmp_")]
    for name in files:
      if not name.startswith(".tmp_") and not name.endswith(".log"):
        _check_file(os.path.join(folder, name), clean)
    if "checkpoints" in os.listdir(folder):
      step = checkpoint.latest_step(folder)
      if step is not None:
        params = checkpoint.load_params(folder, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), (folder, step)
        assert os.path.isdir(os.path.join(folder, "checkpoints", str(step), "data"))


def _sigterm_step(text, name="SIGTERM") -> int | None:
  """The step of the last 'training: SIGTERM at step N; checkpoint saved' in a log (or of
  another signal's `name`)."""
  steps = re.findall(name + r" at step (\d+); checkpoint saved", text)
  return int(steps[-1]) if steps else None


# ---------------------------------------------------------------- training
