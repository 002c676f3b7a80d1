"""The local sweep launcher expands `sweep(add)` into named runs."""
import importlib.util
import json
import os

from siglip_fair import config as cfglib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher():
  spec = importlib.util.spec_from_file_location("launch_local", os.path.join(REPO, "launch", "local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_expands_into_named_runs_with_merged_args():
  _, module = cfglib.load_config_file(os.path.join(REPO, "configs", "siglip.py"))
  runs = _launcher().run_names(module, "steps=10")
  assert len(runs) == 6 and len({name for name, _ in runs}) == 6
  assert ("data=balanced_seed=2", "steps=10,data=balanced,seed=2") in runs
  # Every run's argument string is a valid config.
  for _, arg in runs:
    config = cfglib.get_config(os.path.join(REPO, "configs", "siglip.py") + ":" + arg)
    assert config.total == "10"


TINY_SWEEP = '''
from configs import study


def get_config(arg=None):
  c = study.get_config(arg)
  c.world.sizes.update(dict(train=256, objects=40, people=40, retrieval=40))
  c.batch_size, c.total, c.warmup = 16, "8", "1"
  c.log_every, c.eval_every, c.ckpt_every = "4", "100%", "2"
  for name in ("zeroshot", "rb", "ab", "gender_acc"):
    c.evals[name].bootstrap.num_samples = 10
  return c


def sweep(add):
  for seed in (0, 1):
    add(seed=seed)
'''


def test_killed_runner_restarts_without_redoing_finished_runs(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  config = tmp_path / "tiny.py"
  config.write_text(TINY_SWEEP)
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, os.path.join(REPO, "launch", "local.py"), "--config", str(config),
         "--workdir", str(workdir)]
  env = dict(os.environ, PYTHONPATH=REPO)
  first, second = workdir / "seed=0", workdir / "seed=1"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  # SIGKILL once the second run has a checkpoint: the first is finished, the second half done.
  while not (second / "checkpoints").is_dir() or not any(
      p.name.isdigit() for p in (second / "checkpoints").iterdir()):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (first / "eval.json").exists() and not (second / "eval.json").exists()
  finished_at = (first / "eval.json").stat().st_mtime_ns
  # The restart trains in a child process (--parallel), the path that runs N at once.
  out = subprocess.run(cmd + ["--parallel", "2"], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True).stdout
  assert "2 runs, 1 finished, 1 to go" in out and "seed=1: done" in out
  assert "all 2 runs finished" in out
  assert (first / "eval.json").stat().st_mtime_ns == finished_at
  assert (second / "eval.json").exists()
  # The second run resumed: its metrics cover steps 1..8 once each.
  steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) and steps[-1] == 8
