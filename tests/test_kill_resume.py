"""SIGKILL a training process at a random step, restart it: the final parameters and the order
in which examples were seen equal those of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import kill_process

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_process.py")


def _start(workdir):
  os.makedirs(workdir, exist_ok=True)
  return subprocess.Popen([sys.executable, SCRIPT, str(workdir)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc):
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-3000:]


def _lines(path):
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def _order(workdir):
  """Batch content by stream position; a resumed run re-reads positions after its checkpoint,
  and the last reading of each position is the one training used."""
  with open(os.path.join(workdir, "seen.jsonl")) as f:
    return {pos: (labels, total) for pos, labels, total in map(json.loads, f)}


def test_sigkill_at_a_random_step_then_resume_is_identical(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  reference = _start(whole)
  victim = _start(killed)
  kill_at = int(np.random.default_rng().integers(4, kill_process.STEPS - 4))
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.monotonic() + 600
  while _lines(metrics) < kill_at and victim.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)  # no clean-up: possibly mid-checkpoint
  victim.communicate()
  _finish(reference)
  assert _lines(metrics) < kill_process.STEPS, "the run finished before it could be killed"
  _finish(_start(killed))

  order, expected = _order(killed), _order(whole)
  assert sorted(order) == sorted(expected) and order == expected, kill_at
  with np.load(whole / "params.npz") as a, np.load(killed / "params.npz") as b:
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  with open(metrics) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, kill_process.STEPS + 1))  # no gaps, no duplicates
